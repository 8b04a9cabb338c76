"""The one base class of the errors a user can fix (bad data, bad config, bad files).

Every launcher turns a `UserError` into one `error: <message>` line and exit status 2; any
other exception is a bug in our code and keeps its traceback. The subclasses live beside the
code that raises them (ConfigError in config, ShardError in data.shards, ...); this module
imports nothing, so every layer can use it.
"""


class UserError(ValueError):
    """An expected failure caused by the user's input; the message says what and where."""
