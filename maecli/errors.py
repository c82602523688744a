"""The errors that mean "the user's input is wrong": the CLI turns each into one line on stderr and exit 1.

A leaf module: every other module may raise these, and nothing here imports the rest of maecli.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one sentence that names the value and what was expected."""


class DataError(UserError, ValueError):
    """An image folder, image file or labelled layout that cannot be used."""


class WeightsError(UserError, ValueError):
    """Weights that cannot be read or do not fit."""


class EncoderOnlyError(WeightsError):
    """Weights without a decoder: they embed, but cannot reconstruct."""


class TrainError(UserError, RuntimeError):
    """A training run that cannot start or go on (settings, run folder, a non-finite loss)."""


class UsageError(UserError):
    """Settings that cannot work together (found once the model's shape is known): a bad command line, exit 2."""


class OutputError(UserError, OSError):
    """An output that cannot be written (a full disk, no permission, a folder in the way), named by the path the
    user gave: OutputError(errno or None, why, path). An OSError too, so code that handles write errors sees it."""

    def __str__(self):
        return f"cannot write {self.filename}: {self.strerror}"
