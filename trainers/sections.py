"""The base of every typed config section: unknown keys are errors, assignments re-validated.

It lives apart from trainers/config.py so that each method module can declare its own options
(`search.<method>.*`) without importing the config that collects them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
