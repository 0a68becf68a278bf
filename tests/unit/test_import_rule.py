"""rec_serve may use rec_train.model and rec_train.data, but never DeepSpeed or the training loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def loaded_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; return the top-level modules it loaded that serving must not."""
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'"
        " or m == 'rec_train.train' or m.startswith('rec_train.train.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_serving_modules_loads_no_deepspeed_or_training() -> None:
    assert (
        loaded_after("import rec_serve.predictor, rec_serve.app, rec_serve.deployment, rec_serve.cli") == []
    )


def test_loading_a_model_for_serving_loads_no_deepspeed_or_training(tmp_path: Path) -> None:
    from rec_serve.synthetic import write_tiny_model

    folder = write_tiny_model(tmp_path / "model")
    code = f"from rec_serve.predictor import Predictor\nPredictor.load({str(folder)!r}).recommend_batch([])"
    assert loaded_after(code) == []
