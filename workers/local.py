"""``modelpress compress``: the service's pipeline on local files, with a progress bar."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from workers.compression.base import Callbacks, EngineError
from workers.compression.recipe import Recipe, check_steps_inputs
from workers.pipeline import PipelineInputs, run_pipeline
from workers.reporting import Report


def load_recipe(path: Path, *, has_calibration: bool, has_training: bool) -> Recipe:
    try:
        recipe = Recipe.model_validate(json.loads(path.read_text()))
        check_steps_inputs(recipe.steps, has_calibration, has_training)
    except (ValidationError, ValueError) as exc:
        raise SystemExit(f"invalid recipe {path}: {exc}") from exc
    return recipe


def compress_local(
    model_dir: Path,
    recipe_path: Path,
    out_dir: Path,
    *,
    calibration: Path | None = None,
    evaluation: Path | None = None,
    training: Path | None = None,
    measure_speed: bool = True,
    low_memory: bool | None = None,
) -> Report:
    """Run the recipe in ``recipe_path`` on ``model_dir`` into ``out_dir`` and return the report. The model is
    checked as the service checks it (:func:`workers.pipeline.run_pipeline`: preflight before loading); a
    problem the user can fix exits with its message."""
    recipe = load_recipe(recipe_path, has_calibration=calibration is not None, has_training=training is not None)
    if low_memory is not None:
        try:
            recipe = Recipe.model_validate({**recipe.model_dump(), "low_memory": low_memory})
        except ValidationError as exc:
            raise SystemExit(f"--low-memory: {exc}") from exc
    inputs = PipelineInputs(
        model_dir=model_dir,
        calibration_files=[calibration] if calibration else [],
        evaluation_files=[evaluation] if evaluation else [],
        training_files=[training] if training else [],
        checkpoint_dirs={
            i: out_dir / f".checkpoints/step-{i}" for i, s in enumerate(recipe.steps) if s.method == "distill"
        },
        measure_speed=measure_speed,
    )
    with tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}") as bar:

        def progress(fraction: float, message: str) -> None:
            bar.update(max(0, int(fraction * 1000) - bar.n))
            bar.set_postfix_str(message[:60])

        try:
            report = run_pipeline(recipe, inputs, out_dir, Callbacks(progress=progress))
        except EngineError as exc:
            raise SystemExit(f"error: {exc}") from exc
    return report
