"""One error tree: the CLI turns each leaf into a message and an exit code in one place."""


class LrqError(Exception):
    """Base of every error lrq raises on purpose."""

    exit_code = 1


class InputError(LrqError):
    """Raised when something a user gave (a spec, a file, an option) is refused."""

    exit_code = 2


class SettingsError(InputError):
    """Raised when an LRQ_* environment variable is refused; the message names the variable."""


class SpecError(InputError):
    """Raised when a job spec is invalid; the message names the field."""


class DataError(InputError):
    """Raised when a data file or dataset is refused; the message names the column or row."""


class LimitError(InputError):
    """Raised when a spec would exceed a resource limit set in settings."""


class NotFoundError(InputError):
    """Raised when an id, prefix or name matches nothing (or more than one thing)."""


class StateError(LrqError):
    """Raised when a job is not in a state that allows the operation."""


class SchemaError(LrqError):
    """Raised when the database schema is missing or older than this code."""


class BrokerError(LrqError):
    """Raised when the message broker cannot be reached in time."""


class DeviceError(LrqError):
    """Raised when a requested device (cuda) is not available."""
