// Topic administration for the local streaming stack, run as a single-file source program against the
// broker jar (which carries Kafka's AdminClient):
//
//   java -cp kafka-broker.jar KafkaTopics.java BOOTSTRAP create PARTITIONS TOPIC...   (if not existing)
//   java -cp kafka-broker.jar KafkaTopics.java BOOTSTRAP offsets TOPIC...             (end offset per partition)
//   java -cp kafka-broker.jar KafkaTopics.java BOOTSTRAP grow PARTITIONS TOPIC...     (add partitions up to N)
//   java -cp kafka-broker.jar KafkaTopics.java BOOTSTRAP produce PARTITION TOPIC FILE (each line, in order)
//
// `offsets` prints one line per partition: TOPIC <TAB> PARTITION <TAB> END_OFFSET.

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewPartitions;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.common.errors.TopicExistsException;

public class KafkaTopics {
  public static void main(String[] args) throws Exception {
    Properties props = new Properties();
    props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
    props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "20000");
    try (Admin admin = Admin.create(props)) {
      if (args[1].equals("create")) {
        int partitions = Integer.parseInt(args[2]);
        for (int i = 3; i < args.length; i++) {
          try {
            admin.createTopics(List.of(new NewTopic(args[i], partitions, (short) 1))).all().get();
            System.out.println("created\t" + args[i] + "\t" + partitions);
          } catch (ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) throw e;
            System.out.println("exists\t" + args[i]);
          }
        }
      } else if (args[1].equals("offsets")) {
        List<String> topics = new ArrayList<>();
        for (int i = 2; i < args.length; i++) topics.add(args[i]);
        Map<String, TopicDescription> described = admin.describeTopics(topics).allTopicNames().get();
        Map<TopicPartition, OffsetSpec> request = new HashMap<>();
        for (TopicDescription d : described.values()) {
          d.partitions().forEach(p -> request.put(new TopicPartition(d.name(), p.partition()), OffsetSpec.latest()));
        }
        admin.listOffsets(request).all().get().forEach(
            (tp, info) -> System.out.println(tp.topic() + "\t" + tp.partition() + "\t" + info.offset()));
      } else if (args[1].equals("produce")) {
        int partition = Integer.parseInt(args[2]);
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        try (KafkaProducer<String, String> producer =
            new KafkaProducer<>(p, new StringSerializer(), new StringSerializer())) {
          long n = 0;
          for (String line : Files.readAllLines(Path.of(args[4]))) {
            producer.send(new ProducerRecord<>(args[3], partition, null, line));
            n++;
          }
          producer.flush();
          System.out.println("produced\t" + args[3] + "\t" + partition + "\t" + n);
        }
      } else if (args[1].equals("grow")) {
        int partitions = Integer.parseInt(args[2]);
        Map<String, NewPartitions> request = new HashMap<>();
        for (int i = 3; i < args.length; i++) request.put(args[i], NewPartitions.increaseTo(partitions));
        admin.createPartitions(request).all().get();
        for (int i = 3; i < args.length; i++) System.out.println("grown\t" + args[i] + "\t" + partitions);
      } else {
        throw new IllegalArgumentException("unknown command " + args[1]);
      }
    }
  }
}
