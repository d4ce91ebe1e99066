"""Exception types of ditkit. Tests and the conformance kit assert these types, never messages."""


class DitkitError(Exception):
    """Base class of every error ditkit raises on purpose."""


class PluginError(DitkitError):
    """A plugin failed to import, declared an invalid record, or clashes with another plugin."""


class UnknownModelError(DitkitError, KeyError):
    """``core.load`` was given a name no plugin registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WeightsError(DitkitError):
    """A checkpoint directory does not match the layout the plugin loads."""


class InputError(DitkitError, ValueError):
    """A generation argument breaks the model's rules (size, frame count, steps, prompt)."""


class CompileError(DitkitError, ValueError):
    """``compile_pipeline`` was asked for something the pipeline cannot compile."""


class ParallelError(DitkitError):
    """The sequence-parallel setup is invalid or a rank failed or diverged."""


class RankFailed(ParallelError):
    """A rank of a multi-process run raised; ``rank``, ``error_type`` and ``remote_traceback`` say how."""

    def __init__(self, message: str, rank: int, error_type: str, remote_traceback: str):
        super().__init__(message)
        self.rank, self.error_type, self.remote_traceback = rank, error_type, remote_traceback


class OutputError(DitkitError, ValueError):
    """The output path cannot be written (wrong suffix for the output kind, a directory, not
    writable, disk full) or the output itself is unfit to write (non-finite values)."""


class GenerationError(DitkitError):
    """Generation produced something unusable: a non-finite latent (``step`` says at which
    denoising step it first appeared, ``None`` when only the final output was non-finite)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Interrupted(DitkitError):
    """The run was stopped by a signal (``signum``); the CLI exits with ``128 + signum``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
