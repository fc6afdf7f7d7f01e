"""The CTR serving copy: ids looked up by binary search over sorted keys, values replaced in place, and
versions written as the first version's graph plus new variables, equal to a full save of the same values."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from headrace.models.ctr import CTRModelConfig  # noqa: E402
from headrace.models.ctr_serving import ServingCTR, VersionWriter, save_serving  # noqa: E402
from headrace.models.embedding import FIELDS, serving_ids  # noqa: E402

CONFIG = CTRModelConfig(name="fm", embedding_dim=4)


def _fields(rng, n: int) -> dict:
    cats = [f"{v:08x}" for v in rng.integers(0, 40, n * 26)]
    columns = {name: [str(v) for v in rng.integers(0, 30, n)] for name in FIELDS[:13]}
    columns.update({name: cats[k * n : (k + 1) * n] for k, name in enumerate(FIELDS[13:])})
    columns["C3"] = [""] * n  # a missing field reads the null row
    return {name: tf.constant(v) for name, v in columns.items()}


def _values(rng, fields, keep: float):
    """Rows for a random `keep` share of the fields' ids (the others have none), in random order."""
    ids = np.unique(serving_ids(fields).numpy())
    keys = rng.permutation(ids[rng.random(len(ids)) < keep])
    return keys, rng.normal(size=(len(keys), 4)), rng.normal(size=(len(keys), 1))


def _reference(module, keys, E, w, fields) -> np.ndarray:
    """The same computation with a dictionary for the id -> row lookup."""
    row = {int(k): i + 1 for i, k in enumerate(keys)}
    ids = serving_ids(fields).numpy()
    rows = np.vectorize(lambda i: row.get(int(i), 0))(ids)
    table_E = np.concatenate([np.zeros((1, 4)), E]).astype(np.float32)
    table_w = np.concatenate([np.zeros((1, 1)), w]).astype(np.float32)
    m = module.field_weight.numpy()
    emb, lin = table_E[rows] * m[None, :, None], table_w[rows][..., 0] * m[None, :]
    return tf.sigmoid(module.model(emb, lin) + module.logit_shift).numpy()


def test_binary_search_lookup_equals_a_dictionary_and_update_replaces_every_value():
    rng = np.random.default_rng(0)
    fields = _fields(rng, 64)
    keys, E, w = _values(rng, fields, 0.6)
    module = ServingCTR(CONFIG, keys, E, w, [], np.ones(39), 0.0)
    np.testing.assert_allclose(module.probability(fields), _reference(module, keys, E, w, fields), rtol=1e-6)

    keys2, E2, w2 = _values(rng, fields, 0.3)  # fewer ids, other rows, another shift and mask
    dense = [rng.normal(size=v.shape).astype(np.float32) for v in module.model.weights]
    mask = (rng.random(39) < 0.8).astype(np.float32)
    module.update(keys2, E2, w2, dense, mask, -1.5)
    assert len(module.keys.numpy()) == len(keys2) and np.all(np.diff(module.keys.numpy()) > 0)
    got = module.probability(fields).numpy()
    np.testing.assert_allclose(got, _reference(module, keys2, E2, w2, fields), rtol=1e-5)

    module.update([], np.zeros((0, 4)), np.zeros((0, 1)), [], np.ones(39), 0.0)  # no ids at all
    assert module.probability(fields).shape == (64,)


def test_versions_after_the_first_are_its_graph_with_new_variables_equal_to_a_full_save(tmp_path):
    rng = np.random.default_rng(1)
    fields = _fields(rng, 32)
    module = ServingCTR(CONFIG, *_values(rng, fields, 0.5), [], np.ones(39), 0.0)
    writer = VersionWriter(module)
    writer.write(tmp_path / "v1")
    for version in (2, 3):
        keys, E, w = _values(rng, fields, 0.4 + 0.2 * version)
        dense = [rng.normal(size=v.shape).astype(np.float32) for v in module.model.weights]
        module.update(keys, E, w, dense, np.ones(39), 0.25 * version)
        writer.write(tmp_path / f"v{version}")
        save_serving(module, tmp_path / f"full{version}")
        assert (tmp_path / f"v{version}" / "saved_model.pb").read_bytes() == (
            tmp_path / "v1" / "saved_model.pb"
        ).read_bytes()
        serve = lambda path: tf.saved_model.load(str(path)).signatures["serving_default"](**fields)
        got = serve(tmp_path / f"v{version}")["probability"].numpy()
        full = serve(tmp_path / f"full{version}")["probability"].numpy()
        np.testing.assert_array_equal(got, full)
        np.testing.assert_allclose(got, _reference(module, keys, E, w, fields), rtol=1e-5)
    # Each version differs from the one before (what was published is what was updated).
    first = serve(tmp_path / "v1")["probability"].numpy()
    assert not np.allclose(first, got)
