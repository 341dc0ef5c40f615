"""The job spec is serialized once: what is stored is what the worker re-reads, and defaults never
depend on whether a key was sent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.jobs.spec import JobSpec

UPLOAD = {"upload_id": "upl_x"}
finite = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False)
fraction = st.floats(min_value=0.05, max_value=0.9, allow_nan=False, allow_infinity=False)
ignore = st.lists(st.sampled_from(["lm_head", "down_proj", "mlp.up_proj", "re:.*layers\\.0\\..*"]), max_size=3)


def _optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts where each key is present or absent, independently."""
    return st.fixed_dictionaries({}, optional=fields)


quantize_steps = st.one_of(
    st.builds(
        lambda scheme, extra: {"method": "quantize", "scheme": scheme, **extra},
        st.sampled_from(["w8a16", "w4a16"]),
        _optional(
            algorithm=st.sampled_from(["rtn", "gptq", "awq"]),
            group_size=st.sampled_from([None, 32, 64, 128, "auto"]),
            symmetric=st.booleans(),
            dampening_frac=st.floats(min_value=0.001, max_value=1.0),
            act_order=st.booleans(),
            block_size=st.integers(1, 4096),
            clip_search=st.booleans(),
            ignore=ignore,
        ),
    ),
    st.builds(
        lambda extra: {"method": "quantize", "scheme": "w8a8", **extra},
        _optional(
            activations=st.sampled_from([None, "dynamic", "static"]),
            smoothquant=st.one_of(st.none(), st.builds(lambda a: {"alpha": a}, finite)),
            ignore=ignore,
        ),
    ),
    st.just({"method": "quantize", "scheme": "fp8"}),
)
prune_steps = st.one_of(
    st.builds(
        lambda algorithm, amount, extra: {"method": "prune", "algorithm": algorithm, **amount, **extra},
        st.sampled_from(["magnitude", "wanda", "sparsegpt"]),
        st.one_of(st.builds(lambda s: {"sparsity": s}, st.floats(0.0, 0.95)), st.sampled_from([{"pattern": "2:4"}])),
        _optional(ignore=ignore, block_size=st.integers(1, 4096)),
    ),
    st.builds(
        lambda targets: {"method": "prune", "algorithm": "structured", "targets": targets},
        _optional(layers=fraction, heads=fraction, mlp=fraction).filter(bool),
    ),
)
distill_steps = st.builds(
    lambda student, extra: {"method": "distill", "student": student, "max_steps": 10, **extra},
    st.sampled_from(
        [
            {"from_teacher": {"keep_ratio": 0.5}},
            {"from_teacher": {"layers": [0, 2]}},
            {"upload_id": "upl_student"},
            {"previous_step": True},
            {"config": {"num_hidden_layers": 2}},
        ]
    ),
    _optional(
        temperature=st.floats(0.1, 20.0),
        ce_weight=st.floats(0.0, 10.0),
        hidden_states=st.sampled_from([None, {"layer_map": [[0, 1]], "weight": 0.5}]),
    ),
)
specs = st.builds(
    lambda steps, extra: {
        "model": UPLOAD,
        "steps": steps,
        "calibration": {"upload_id": "upl_calib"},
        "training": {"upload_id": "upl_train"},
        **extra,
    },
    st.lists(st.one_of(quantize_steps, prune_steps, distill_steps), min_size=1, max_size=4),
    _optional(
        metadata=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3),
        hardware=st.sampled_from(["auto", "cpu", "gpu"]),
        evaluation=st.sampled_from([{"upload_id": "upl_eval", "seq_len": 64}]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(specs)
def test_stored_spec_round_trips_unchanged(body: dict[str, Any]) -> None:
    """API (validate the request) → DB (the canonical JSON) → worker (re-validate) gives the same spec."""
    try:
        spec = JobSpec.model_validate(body)
    except ValidationError:
        return  # combinations the spec refuses (e.g. awq on w8a8) never reach the database
    stored = json.loads(json.dumps(spec.canonical()))  # the JSON column
    reread = JobSpec.model_validate(stored)
    assert reread == spec
    assert reread.canonical() == stored
    # What the engines get is the same too.
    assert reread.recipe() == spec.recipe()


def test_null_group_size_stays_per_channel() -> None:
    """``group_size: null`` is "one scale per output channel", also after the stored form is re-read."""
    body = {"model": UPLOAD, "steps": [{"method": "quantize", "scheme": "w4a16", "group_size": None}]}
    stored = JobSpec.model_validate(body).canonical()
    assert stored["steps"][0]["group_size"] is None
    assert JobSpec.model_validate(stored).steps[0].group_size is None  # type: ignore[union-attr]
    omitted = JobSpec.model_validate({"model": UPLOAD, "steps": [{"method": "quantize", "scheme": "w4a16"}]})
    assert omitted.steps[0].group_size == "auto"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"method": "quantize", "scheme": "w8a16", "ignore": ["re:(unclosed"]}, "ignore"),
        ({"method": "prune", "algorithm": "magnitude", "sparsity": 0.5, "ignore": ["re:["]}, "ignore"),
        ({"method": "quantize", "scheme": "w8a16", "ignore": ["x"] * 1000}, "ignore"),
        ({"method": "distill", "student": {"previous_step": True}, "max_steps": 1, "kl_weight": math.inf}, "kl_weight"),
        (
            {"method": "distill", "student": {"previous_step": True}, "max_steps": 1, "max_grad_norm": math.nan},
            "max_grad_norm",
        ),
        (
            {"method": "distill", "student": {"previous_step": True}, "max_steps": 1, "weight_decay": 1e9},
            "weight_decay",
        ),
    ],
)
def test_bad_step_options_name_the_field(step: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate({"model": UPLOAD, "steps": [step], "training": {"upload_id": "t"}})
    locations = [".".join(str(part) for part in error["loc"]) for error in raised.value.errors()]
    assert any(location.endswith(field) for location in locations), locations


def test_student_config_with_remote_code_is_refused_however_spelled() -> None:
    for config in ({"auto_map": {}}, {"text_config": {"auto_map": {"x": "y"}}}):
        with pytest.raises(ValidationError, match="remote code"):
            JobSpec.model_validate(
                {
                    "model": UPLOAD,
                    "training": {"upload_id": "t"},
                    "steps": [{"method": "distill", "student": {"config": config}, "max_steps": 1}],
                }
            )


def test_recipe_module_is_torch_free_and_engines_do_not_import_app() -> None:
    """The recipe loads no torch (the API validates without it); an engine loads no ``app``."""
    recipe_only = "import sys; import workers.compression.recipe, app.jobs.spec; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", recipe_only], check=True)
    engines_only = (
        "import sys; import workers.compression.quantize, workers.compression.prune, workers.compression.distill, "
        "workers.compression.streaming, workers.compression.evaluate; "
        "leaked = [m for m in sys.modules if m == 'app' or m.startswith('app.')]; assert not leaked, leaked"
    )
    subprocess.run([sys.executable, "-c", engines_only], check=True)
