// Topic administration for the local streaming stack, run as a single-file source program against the
// broker jar (which carries Kafka's AdminClient):
//
//   java -cp kafka-broker.jar KafkaTopics.java BOOTSTRAP create PARTITIONS TOPIC...   (if not existing)
//   java -cp kafka-broker.jar KafkaTopics.java BOOTSTRAP offsets TOPIC...             (end offset per partition)
//
// `offsets` prints one line per partition: TOPIC <TAB> PARTITION <TAB> END_OFFSET.

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.common.TopicPartition;
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
      } else {
        throw new IllegalArgumentException("unknown command " + args[1]);
      }
    }
  }
}
