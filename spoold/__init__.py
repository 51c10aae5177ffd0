"""spoold: a durable local spool that ships lines to Kinesis, Firehose and Yandex Data Streams."""

__version__ = "0.1.0"
