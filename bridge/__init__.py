"""bitrix24-bridge: Bitrix24 offline events into RabbitMQ, confirmed before cleared."""

__version__ = "0.1.0"
