"""Exception types of the MediRound core. Every error a user can cause is one of these."""


class MediRoundError(Exception):
    """Base class: a problem with the user's input or environment, with a message that says what and where."""


class VolumeError(MediRoundError):
    """A volume or slice cannot be used (shape, dtype, values, geometry)."""


class FileFormatError(MediRoundError):
    """A file is missing, unreadable, truncated or of the wrong type."""


class SessionError(MediRoundError):
    """A session cannot be used as asked (wrong volume, missing round, corrupt file)."""


class SessionBusyError(SessionError):
    """Another program (or task) is writing the session; names the holder."""


class RoundReferenceError(MediRoundError):
    """A round refers to a round that does not exist (missing or in the future)."""


class QueryError(MediRoundError):
    """A query is empty, too long or not printable text."""


class CheckpointError(MediRoundError):
    """A checkpoint is missing, unsafe, or does not match the model (names the key)."""


class ConfigError(MediRoundError):
    """A model configuration is incomplete or inconsistent."""


class OptionError(MediRoundError, ValueError):
    """Command options (or the arguments of the function behind them) that are invalid or conflict."""


class DatasetError(MediRoundError):
    """A dataset file breaks the MR-MedSeg format."""


class DeviceError(MediRoundError):
    """The compute device failed (out of memory, driver error) and no fallback was possible."""


