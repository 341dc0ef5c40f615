"""Typed step configurations: the server's own pydantic models, one definition for server and client.

```python
from modelpress.steps import QuantizeStep
mp.jobs.create(model="./my-model", steps=[QuantizeStep(scheme="w4a16", algorithm="gptq", group_size=64)])
```
Plain dicts work as well (``{"method": "quantize", "scheme": "w4a16"}``). These models are pure pydantic: this
import loads neither torch nor the server's web or database stack, and ``import modelpress`` does not load it.
"""

# The one place the client names where the step models live: the engines' recipe vocabulary, and the
# service's distill step (whose student may also be an upload or an s3:// model).
from app.jobs.spec import DistillJobStep as DistillStep
from workers.compression.recipe import ExportStep, PruneStep, QuantizeStep

__all__ = ["DistillStep", "ExportStep", "PruneStep", "QuantizeStep"]
