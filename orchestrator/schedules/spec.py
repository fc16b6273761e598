"""The `schedule` config section (../shared/SCHEDULING.md section 2): only `cron` is required."""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from orchestrator.schedules.slots import check_cron
from trainers.sections import Section


class ScheduleSpec(Section):
    name: str | None = Field(None, description="default: the config's name; [a-z0-9-], <= 24 "
                             "characters (it goes into Ray submission ids and KubeRay names)")
    cron: str = Field(description="5-field cron, e.g. '0 2 * * *' (02:00 every day)")
    timezone: str = Field("Etc/UTC", description="IANA zone the cron is read in")
    overlap: Literal["skip", "queue", "replace", "allow"] = Field(
        "skip", description="a slot is due while an earlier one runs: skip it (recorded), queue "
        "it until the earlier one ends (within the deadline), stop the earlier one, or run both")
    starting_deadline_s: float = Field(21600, gt=0, description="a due slot older than this is "
                                       "recorded MISSED, never run late")
    catch_up: Literal["latest", "none"] = Field(
        "latest", description="after downtime: run the latest missed slot, or none (never all)")
    max_attempts: int = Field(2, ge=1, description="FAILED / LOST slots are resubmitted, and "
                              "resume, up to this many attempts")
    refresh_dense: Literal["always", "on_data_change", "never"] = "on_data_change"
    warm_start: Literal["none", "previous_front"] = Field(
        "previous_front", description="the previous slot's Pareto parameters run first")
    address: str = Field("http://127.0.0.1:8265", description="the Ray dashboard (Jobs API)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?", v):
            raise ValueError(f"schedule.name={v!r}; allowed: lowercase letters, digits and "
                             "inner '-', at most 24 characters (e.g. 'nightly')")
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return check_cron(v)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"schedule.timezone={v!r} is not an IANA time zone "
                             "(e.g. 'Etc/UTC', 'Europe/Berlin', 'America/New_York')") from None
        return v
