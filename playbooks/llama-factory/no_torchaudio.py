"""Stands in for torchaudio where it is left out: with the CUDA wheel torch (python.nix) and in the test venv
on a CPU torch (tests/test_llama_factory.py). LLaMA-Factory imports torchaudio at module level
(llamafactory/data/mm_plugin.py) but uses it only to read audio inputs; that use raises an ImportError naming
the reason. Dunder look-ups raise AttributeError, so probes like `getattr(module, "__version__", None)` see an
absent attribute."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"torchaudio.{name}: torchaudio is not installed with this torch, so audio inputs are unsupported "
        "(see playbooks/llama-factory/README.md, Versions)"
    )
