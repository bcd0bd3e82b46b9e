"""An independent Kafka client (confluent-kafka) for sluice's interop test.

  kafka_client.py read BROKERS TOPIC COUNT
      Reads COUNT records from the start of every partition of TOPIC; prints one JSON line per
      record: {"partition", "offset", "key", "value"}.
  kafka_client.py produce BROKERS TOPIC
      Produces the JSON lines of stdin ({"key", "value"}, value a JSON object) with the
      Java-compatible murmur2 partitioner; prints {"key", "partition", "offset"} per record.
"""

import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition


def read(brokers, topic, count):
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": "interop-reader",
        "enable.auto.commit": False,
    })
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    seen = 0
    deadline = time.time() + 30
    while seen < count and time.time() < deadline:
        message = consumer.poll(0.2)
        if message is None:
            continue
        if message.error():
            raise SystemExit(f"consumer error: {message.error()}")
        print(json.dumps({
            "partition": message.partition(),
            "offset": message.offset(),
            "key": message.key().decode(),
            "value": json.loads(message.value()),
        }))
        seen += 1
    consumer.close()
    if seen < count:
        raise SystemExit(f"read {seen} of {count} records within 30 s")


def produce(brokers, topic):
    producer = Producer({
        "bootstrap.servers": brokers,
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
    })
    failures = []

    def report(error, message):
        if error is not None:
            failures.append(str(error))
            return
        print(json.dumps({
            "key": message.key().decode(),
            "partition": message.partition(),
            "offset": message.offset(),
        }))

    for line in sys.stdin:
        record = json.loads(line)
        producer.produce(topic, key=record["key"], value=json.dumps(record["value"]),
                         on_delivery=report)
    producer.flush(30)
    if failures:
        raise SystemExit(f"delivery failed: {failures}")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "read":
        read(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "produce":
        produce(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
