"""One exception type per exit code, so every failure ends as one clear line.

Exit codes (documented in README.md):
  0  ok
  1  a check, verification or test failed
  2  bad usage or input (unknown pin, malformed compat.yaml, dirty worktree without --force, ...)
  3  environment problem (git, nvcc, torch, CUDA_HOME, network, disk, a file we may not read or write)
  4  a patch did not apply (the workspace restored to its exact pre-apply state), a rebase stopped at a
     conflict, or a revert could not replay a commit of yours (nothing changed)
  130 interrupted (Ctrl-C); an apply or revert under way restores the workspace first
"""

import errno

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENV = 3
EXIT_PATCH = 4
EXIT_INTERRUPTED = 130

# An OSError of these is a path that cannot be what it was given as (a directory where a file goes, a
# file where a directory goes, a name too long): bad input (2), not the environment (3).
PATH_SHAPE_ERRORS = (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG)


def name_some(paths: list[str]) -> str:
    """'a, b, c and 4 more': the paths an error line names, the first three of them."""
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


class DsparkError(Exception):
    exit_code = EXIT_FAILED


class CheckFailed(DsparkError):
    exit_code = EXIT_FAILED


class UsageError(DsparkError):
    exit_code = EXIT_USAGE


class EnvironmentProblem(DsparkError):
    exit_code = EXIT_ENV


class PatchFailed(DsparkError):
    exit_code = EXIT_PATCH


def missing_module(command: str, exc: ImportError, packages: tuple[str, ...]) -> EnvironmentProblem:
    """An optional dependency (one of `packages`, pip names equal to module names) that does not
    import: one line naming what to install, instead of the ImportError's traceback."""
    name = (exc.name or "").split(".")[0]
    if isinstance(exc, ModuleNotFoundError) and name in packages:
        return EnvironmentProblem(f"{command} needs {name}, which is not installed in this Python "
                                  f"(pip install {name})")
    return EnvironmentProblem(f"{command} needs {' and '.join(packages)}: {exc}")


def short_message(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (a validator's first line is
    often only its name; the reason follows)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
