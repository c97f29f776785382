"""What `import mixture_of_tokens` gives a fresh process: the `mot` model type registered with transformers' Auto
classes, so a saved folder loads without trust_remote_code, whatever the process's command line, and every name of
`__all__`, also in a process that skips the registration, which only the `mot` console script declares (`mot COMMAND
--help`; tests/test_cli.py). And the lower bounds that the README states (torch, transformers, lm-eval) are
pyproject's."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_fresh(script: str) -> list[str]:
    """The words of the last line `script` prints in a new interpreter (libraries may log lines before it)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()[-1].split()


def test_importing_the_package_lets_the_auto_classes_load_a_saved_folder(tiny_model_folder):
    folder = tiny_model_folder("model")
    out = run_fresh(f"""
        import mixture_of_tokens
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained({str(folder)!r})
        base = AutoModel.from_pretrained({str(folder)!r})
        causal = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        print(type(config) is mixture_of_tokens.MoTConfig, type(base) is mixture_of_tokens.MoTModel,
              type(causal) is mixture_of_tokens.MoTForCausalLM)
    """)
    assert out == ["True", "True", "True"]


def test_every_public_name_resolves_where_the_registration_is_skipped():
    out = run_fresh("""
        import sys
        import mixture_of_tokens_console
        mixture_of_tokens_console.USES_NO_MODEL = True  # as its main() does for `mot generate --help`
        import mixture_of_tokens
        skipped = "torch" not in sys.modules
        print(skipped, all(getattr(mixture_of_tokens, name) is not None for name in mixture_of_tokens.__all__),
              set(mixture_of_tokens.__all__) <= set(dir(mixture_of_tokens)))
    """)
    assert out == ["True", "True", "True"]


def test_importing_the_package_registers_whatever_the_command_line():
    """The registration does not depend on how the process was started: a program called `mot`, asked for help,
    that imports the package itself still gets the `mot` model type registered."""
    out = run_fresh("""
        import sys
        sys.argv = ["/usr/bin/mot", "card", "--help"]
        import mixture_of_tokens
        from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING
        print(CONFIG_MAPPING["mot"].__name__, MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING["mot"]].__name__)
    """)
    assert out == ["MoTConfig", "MoTForCausalLM"]


def test_the_readme_states_the_lower_bounds_that_pyproject_declares_and_ci_tests():
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = " ".join((REPO / "README.md").read_text().split())
    for name in ("torch", "transformers"):
        bound = re.search(rf'"{name}>=([0-9][0-9.]*)', pyproject).group(1)
        assert f"{name} {bound} or newer" in readme, name  # Set-up
        assert f"`{name}=={bound}`" in readme, name  # Development: what CI's second part pins
    lm_eval_bound = re.search(r'"lm-eval>=([0-9][0-9.]*)', pyproject).group(1)
    assert f"`lm-eval=={lm_eval_bound}`" in readme  # pinned there too
