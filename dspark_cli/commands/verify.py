"""`dspark verify ops|vllm|tgi`: check a built extension or a patched engine for real."""

import importlib

import typer

from dspark_cli.commands.params import command_group, flag_option

from dspark_cli.cuda_env import torch_info
from dspark_cli.errors import EnvironmentProblem, missing_module, short_message


def _require_torch() -> None:
    """The ops and TGI checks run torch in this process: without it, one line and exit 3. A CPU
    build is enough here (the TGI checks run on the CPU; the ops check says itself that it needs a GPU)."""
    torch = torch_info()  # from torch/version.py: installed, but not yet imported
    if torch.version is None:
        raise EnvironmentProblem(f"{torch.problem}; {torch.hint}")
    try:
        importlib.import_module("torch")  # the checks import it next: a broken install is one line here
    except ImportError as exc:  # a missing CUDA library, an undefined symbol
        raise EnvironmentProblem(f"torch {torch.version} is installed but does not import: {short_message(exc)}; "
                                 "reinstall torch (pip install --force-reinstall torch==<the version you need>)") from None


def register(app: typer.Typer) -> None:
    verify = command_group(help="Verify the built extension or a patched engine.")

    @verify.command("ops")
    def verify_ops(as_json: bool = flag_option("--json", help="Machine-readable output.")) -> None:
        """Load the built CUDA extension and check every op against the torch reference on the GPU."""
        _require_torch()
        from dspark_cli.selftest import run_self_test

        run_self_test(as_json=as_json)

    @verify.command("vllm")
    def verify_vllm(
        as_json: bool = flag_option("--json", help="Machine-readable output."),
    ) -> None:
        """Run DSpark end to end in the installed, patched vLLM and compare with no speculation."""
        from dspark_cli.integrations.vllm.verify import run

        run(as_json=as_json)

    @verify.command("tgi")
    def verify_tgi(as_json: bool = flag_option("--json", help="Machine-readable output.")) -> None:
        """Check the installed, patched TGI server package against dspark_cli.runtime."""
        _require_torch()
        try:
            import transformers  # noqa: F401 -- the TGI-side loop runs a transformers target
        except ImportError as exc:
            raise missing_module("dspark verify tgi", exc, ("transformers",)) from exc
        from dspark_cli.integrations.tgi.verify import run

        run(as_json=as_json)

    app.add_typer(verify, name="verify")
