"""Every error the package raises on purpose, in one leaf module that imports nothing of ours.

Three bases say what the CLI does with an error: :class:`InputError` (exit 2: the input cannot run; raised
before Ray starts or the store is touched), :class:`RunError` (exit 4: the run failed after its input was
accepted; what finished is kept) and :class:`IncompleteRunError` (exit 3: work is left; the same command
continues it). Each keeps its built-in base (``ValueError`` or ``RuntimeError``) so plain callers can catch it.
"""

from __future__ import annotations

__all__ = [
    "ChoiceError",
    "ComparisonError",
    "ConfigError",
    "DamagedArtifactError",
    "DamagedSetError",
    "DataError",
    "EvaluationInputError",
    "EvaluationRunError",
    "FinetuneInputError",
    "FlipInputError",
    "IncompleteRunError",
    "InputError",
    "LossConfigError",
    "ModelError",
    "ModelFingerprintError",
    "NightlyError",
    "NonFiniteOutputError",
    "NotASetError",
    "RayStartError",
    "RcatRayError",
    "RunError",
    "RunIdentityError",
    "StoreError",
    "SweepFailedError",
    "SweepInterruptedError",
    "UncheckedArtifactError",
]


class RcatRayError(Exception):
    """The base of every error this package raises on purpose (a bug raises something else)."""


class InputError(RcatRayError, ValueError):
    """Input that cannot run: one clear message, exit status 2."""


class RunError(RcatRayError, RuntimeError):
    """A run that failed after its input was accepted: one line with the cause, exit status 4."""


class IncompleteRunError(RcatRayError, RuntimeError):
    """The run stopped with work left (``max_new_chunks``); the same command continues it (exit status 3)."""


class SweepInterruptedError(RcatRayError, RuntimeError):
    """The sweep was stopped (Ctrl+C, SIGINT) before every trial finished; it can be resumed."""


# -- input errors (exit 2) ----------------------------------------------------------------------------
class ConfigError(InputError):
    """A configuration that cannot run; the message names the offending field."""


class DataError(InputError):
    """Data that cannot be loaded; the message says what to place where."""


class DamagedSetError(DataError):
    """A file of a prepared sample set does not match its dataset.json (missing, truncated, altered,
    undecodable), or dataset.json itself is unreadable. ``name`` is the file (relative to the set's folder) and
    ``problem`` the short reason, so a checker can report each file without parsing messages."""

    REDO = (
        "move the folder aside and prepare the set again (a set in a result store: `rcat-ray store verify --repair` "
        "moves it to the store's quarantine and the next run prepares it)"
    )

    def __init__(self, uri: str, name: str, problem: str, sep: str = " "):
        self.name = name
        self.problem = problem
        super().__init__(f"{uri.rstrip('/')}/{name}{sep}{problem}; {self.REDO}")


class NotASetError(DataError):
    """A non-empty folder without dataset.json where a set should be: someone else's folder, or (inside a
    result store's ``samples/``, where every folder is ours) a set that lost its dataset.json."""


class ModelError(InputError):
    """A model that cannot be loaded or does not fit the data; the message says what to fix."""


class ModelFingerprintError(ModelError):
    """A worker loaded other weights than the driver planned with: storing rows under the planned key would lie."""


class EvaluationInputError(InputError):
    """Inputs that cannot be evaluated together (caught before any attack runs)."""


class ComparisonError(InputError):
    """Two tables that cannot be compared (different samples or attack)."""


class FlipInputError(InputError):
    """Two per-sample tables that cannot be compared (different samples, labels, missing columns, ...)."""


class LossConfigError(InputError):
    """Loss weights outside their valid range."""


class FinetuneInputError(InputError):
    """Fine-tuning inputs that cannot run as asked (e.g. cached masks that do not cover the training samples)."""


class RunIdentityError(InputError):
    """A stored fine-tune (checkpoint or snapshot) has another identity than the one asked for."""


class ChoiceError(InputError):
    """No sweep trial satisfies the choice rule."""


class NightlyError(InputError):
    """The night cannot run (a missing candidate and the like)."""


class StoreError(InputError, RuntimeError):
    """The store cannot be used (unwritable, unreachable, or an artifact is damaged)."""


class DamagedArtifactError(StoreError):
    """A stored file does not match the checksum its manifest records, or the manifest itself is unreadable.
    ``path`` is the store-relative path of the file that failed, so callers can move its artifact aside."""

    def __init__(self, path: str, problem: str, uri: str = ""):
        self.path = path
        self.problem = problem
        where = f"{uri.rstrip('/')}/{path}" if uri else path
        super().__init__(f"damaged artifact {where}: {problem}")


class UncheckedArtifactError(DamagedArtifactError):
    """A manifest that parses but records no checksums (written before checksums existed, or reduced to something
    else): nothing it covers can be verified; callers decide whether that is damage."""


# -- run errors (exit 4) ------------------------------------------------------------------------------
class RayStartError(RunError):
    """Ray could not be started or joined (a local instance that timed out on a loaded machine, a cluster that
    cannot be reached)."""


class EvaluationRunError(RunError):
    """An evaluation that failed after its inputs were accepted (a chunk that failed on a worker)."""


class NonFiniteOutputError(EvaluationRunError):
    """A model gave non-finite outputs during the attack: the chunk's rows are not stored."""


class SweepFailedError(RunError):
    """Every trial of a sweep failed."""
