"""The image input pipeline: image-ingest's JPEG shards -> batches a trainer never waits for.

Built the way pod-scale ResNet input pipelines are (Ying et al. 2018; the TPU reference input_fn):

* the files are sharded per client (``num_clients``, ``client_id``: each host reads its own files),
  shuffled, and read by a parallel interleave;
* training decodes only the crop it keeps: a distorted bounding box sampled from the JPEG header's
  shape (Inception-style: 8-100% of the area, aspect 3/4-4/3), then ``tf.image.decode_and_crop_jpeg``,
  a resize to ``image_size`` and a random left-right flip. Every random draw is stateless, seeded by
  (seed, epoch, which read of its file, its place in the file), so a run's crops are the same at any
  parallelism, whatever order the parallel reads deliver them in;
* eval takes the central ``image_size / (image_size + 32)`` of the shorter side, decoded the same way,
  and caches the decoded set (the eval set is read every evaluation);
* images stay uint8 through the per-example work; normalisation (ImageNet mean and deviation) and the
  cast to float32 or bfloat16 run once per batch, after batching;
* prefetch, and tf.data options: autotuned parallelism and buffers, a private thread pool, and
  deterministic order off for training.

`naive_dataset` is the baseline `bench/image_input.py` measures against: decode the whole image, then
crop, one thread, no prefetch. Both read the feature spec the ingest wrote (``OUT/spec.json``).
"""

from __future__ import annotations

from collections.abc import Sequence

from headrace.transforms.tfrecord import FeatureSpec, list_shards, read_spec

__all__ = ["MEAN_RGB", "STDDEV_RGB", "image_dataset", "naive_dataset"]

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_PADDING = 32


def _tf():
    import tensorflow as tf

    return tf


def _files(out: str, split: str, num_clients: int, client_id: int) -> tuple[list[str], FeatureSpec]:
    out = str(out).rstrip("/")
    spec = read_spec(out, split)
    if "image" not in spec.features or "label" not in spec.features:
        raise ValueError(f"{out}/{split}: not image-ingest output (its spec has no image and label)")
    files = list_shards(f"{out}/{split}-*.tfrecord*")
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id {client_id} outside 0..{num_clients - 1}")
    if len(files) < num_clients:
        raise ValueError(
            f"{out}/{split}: {len(files)} shard files for {num_clients} clients; ingest with --shards "
            f">= {num_clients} so that every client reads its own files"
        )
    return files[client_id::num_clients], spec


def _parse(spec: FeatureSpec):
    """Parses the two features the trainers use, with the writer's own declarations."""
    tf = _tf()
    features = {k: v for k, v in spec.tf_features().items() if k in ("image", "label")}

    def parse(serialized):
        return tf.io.parse_single_example(serialized, features)

    return parse


def _train_crop(jpeg, image_size: int, seed, area_range, aspect_ratio_range, flip: bool = True):
    """The sampled crop, decoded alone, resized, flipped at random (uint8)."""
    tf = _tf()
    shape = tf.image.extract_jpeg_shape(jpeg)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _center_crop(jpeg, image_size: int, padding: int = CROP_PADDING):
    tf = _tf()
    shape = tf.image.extract_jpeg_shape(jpeg)
    h, w = shape[0], shape[1]
    side = tf.cast(image_size / (image_size + padding) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    side = tf.maximum(side, 1)
    window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _normalize(dtype: str):
    tf = _tf()
    mean = tf.constant(MEAN_RGB, tf.float32)
    std = tf.constant(STDDEV_RGB, tf.float32)

    def normalize(batch):
        images = (tf.cast(batch["image"], tf.float32) - mean) / std
        return {"image": tf.cast(images, dtype), "label": tf.cast(batch["label"], tf.int32)}

    return normalize


def image_dataset(
    out: str,
    split: str,
    batch_size: int,
    *,
    image_size: int = 224,
    training: bool | None = None,
    seed: int = 0,
    epoch: int = 0,
    repeat: bool | None = None,
    num_clients: int = 1,
    client_id: int = 0,
    dtype: str = "float32",
    shuffle_buffer: int = 4096,
    cache_eval: bool = True,
    private_threads: int | None = None,
    area_range: Sequence[float] = (0.08, 1.0),
    aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
    flip: bool = True,
    crop_padding: int = CROP_PADDING,
    drop_remainder: bool | None = None,
):
    """Batches ``{"image": [B, S, S, 3] dtype, normalised; "label": [B] int32}`` of ``OUT/{split}``.

    `training` (default: split == "train") picks the augmented, shuffled, repeated, order-free path;
    otherwise the central crops in a fixed order, once (cached after decoding when `cache_eval`).
    Eval keeps the central ``image_size / (image_size + crop_padding)`` of the shorter side (0: all of
    it, for images already framed, like digits); `flip` off for images a mirror changes.
    """
    tf = _tf()
    training = split == "train" if training is None else training
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: float32 or bfloat16")
    files, spec = _files(out, split, num_clients, client_id)
    autotune = tf.data.AUTOTUNE
    parse = _parse(spec)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed + epoch, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        # Each read of a file is numbered (visit), and each record by its place in the file: that pair,
        # not the order the parallel reads deliver records in, seeds the record's crop and flip.
        ds = ds.enumerate().interleave(
            lambda visit, f: (
                tf.data.TFRecordDataset(f, buffer_size=8 << 20)
                .enumerate()
                .map(lambda i, record: (visit, i, record))
            ),
            cycle_length=min(len(files), 16),
            block_length=16,
            num_parallel_calls=autotune,
            deterministic=False,
        )
        ds = ds.shuffle(shuffle_buffer, seed=seed + epoch, reshuffle_each_iteration=True)
        base = (seed * 1_000_003 + epoch) << 24

        def train_map(visit, index, serialized):
            record = parse(serialized)
            key = tf.stack([base + visit, index])
            image = _train_crop(record["image"], image_size, key, area_range, aspect_ratio_range, flip)
            return {"image": image, "label": record["label"]}

        ds = ds.map(train_map, num_parallel_calls=autotune, deterministic=False)
    else:
        ds = ds.interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
            cycle_length=min(len(files), 16),
            block_length=16,
            num_parallel_calls=autotune,
            deterministic=True,
        )

        def eval_map(serialized):
            record = parse(serialized)
            image = _center_crop(record["image"], image_size, crop_padding)
            return {"image": image, "label": record["label"]}

        ds = ds.map(eval_map, num_parallel_calls=autotune, deterministic=True)
        if cache_eval:
            ds = ds.cache()
        if repeat:
            ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=autotune)
    ds = ds.map(_normalize(dtype), num_parallel_calls=autotune)
    ds = ds.prefetch(autotune)
    options = tf.data.Options()
    options.autotune.enabled = True
    options.deterministic = not training
    options.threading.private_threadpool_size = private_threads or 0
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options)


def naive_dataset(out: str, split: str, batch_size: int, *, image_size: int = 224, seed: int = 0):
    """The baseline: every record decoded whole, then a random crop of the same area law, resized and
    flipped; one thread, no prefetch, no interleave."""
    tf = _tf()
    files, spec = _files(out, split, 1, 0)
    parse = _parse(spec)
    rng = tf.random.Generator.from_seed(seed)

    def decode(serialized):
        record = parse(serialized)
        image = tf.io.decode_jpeg(record["image"], channels=3)
        shape = tf.shape(image)
        key = rng.make_seeds(1)[:, 0]
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=key,
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(image, [image_size, image_size])
        image = tf.image.stateless_random_flip_left_right(image, seed=key[::-1])
        return {"image": image, "label": record["label"]}

    ds = tf.data.TFRecordDataset(files).map(decode).batch(batch_size, drop_remainder=True)
    ds = ds.map(_normalize("float32"))
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    return ds.with_options(options)
