"""The AMQP side: a publisher protocol, the aio-pika publisher, an in-memory fake."""
