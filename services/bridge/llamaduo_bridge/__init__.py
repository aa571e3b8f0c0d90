"""LlamaDuo bridge: start migrations from Kafka, RabbitMQ, Redis Streams or MQTT, and get their events back there."""
