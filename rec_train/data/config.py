"""The typed config of `rec-train prepare` (see `configs/data/*.yaml`)."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rec_train.config import StrictModel

Format = Literal["movielens", "sequences", "parquet", "csv"]
Policy = Literal["drop", "keep", "error"]


class EventColumns(StrictModel):
    """Column names of the events table (formats `parquet` and `csv`)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = Field("timestamp", description="null: the row order is the time order")
    value: str | None = Field(None, description="rating or weight; must be numeric when set")
    event_type: str | None = Field(None, description="kind of interaction (view, click, purchase, ...)")


class ItemColumns(StrictModel):
    """Column names of the item table (formats `parquet` and `csv`)."""

    item: str = "item_id"
    title: str | None = "title"
    text: list[str] = Field(
        default_factory=lambda: ["title", "genres"],
        description="joined with '. ' into the item text the language model embeds",
    )


class CsvOptions(StrictModel):
    delimiter: str = Field(",", min_length=1, max_length=1)
    header: bool = True


class SplitConfig(StrictModel):
    """Leave-one-out (last event = test, second to last = validation) or global time cutoffs."""

    kind: Literal["leave_one_out", "time"] = "leave_one_out"
    valid_cutoff: int | None = Field(None, description="timestamp (source units or ISO date) for `time`")
    test_cutoff: int | None = None

    @field_validator("valid_cutoff", "test_cutoff", mode="before")
    @classmethod
    def _parse_date(cls, value: object) -> object:
        """ISO dates ("2000-12-31" or a datetime) become Unix seconds (UTC)."""
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            try:
                value = datetime.fromisoformat(value.strip())
            except ValueError as exc:
                raise ValueError(f"{value!r} is neither an integer timestamp nor an ISO date") from exc
        if isinstance(value, date) and not isinstance(value, datetime):  # YAML reads 2000-12-31 as a date
            value = datetime(value.year, value.month, value.day)
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)
            return int(value.timestamp())
        return value

    @model_validator(mode="after")
    def _check_cutoffs(self) -> SplitConfig:
        if self.kind == "time":
            if self.valid_cutoff is None or self.test_cutoff is None:
                raise ValueError("split.kind=time needs split.valid_cutoff and split.test_cutoff")
            if self.valid_cutoff > self.test_cutoff:
                raise ValueError(
                    f"split.valid_cutoff ({self.valid_cutoff}) must not be after split.test_cutoff"
                    f" ({self.test_cutoff})"
                )
        elif self.valid_cutoff is not None or self.test_cutoff is not None:
            raise ValueError("split.valid_cutoff / split.test_cutoff are only used with split.kind=time")
        return self


class PrepareConfig(StrictModel):
    """Raw events (+ optional item table) -> a prepared sequence dataset under `output`."""

    format: Format = Field(description="movielens | sequences | parquet | csv")
    events: str = Field(description="events file or folder of files: local path, file:// or s3://")
    items: str | None = Field(None, description="item table with titles / text (optional)")
    output: str
    columns: EventColumns = Field(default_factory=EventColumns)
    item_columns: ItemColumns = Field(default_factory=ItemColumns)
    csv: CsvOptions = Field(default_factory=CsvOptions)
    integer_ids: bool | None = Field(None, description="ids must be integers; default: true for movielens")
    event_types: list[str] | None = Field(
        None,
        description="keep only events of these types (columns.event_type); the others are counted as skipped",
    )
    min_value: float | None = Field(
        None, description="events whose value (rating) is below this are skipped and counted, e.g. 4.0"
    )
    min_item_count: int = Field(1, ge=1, description="items with fewer events are dropped (counted)")
    min_user_events: int = Field(3, ge=1, description="users with fewer events follow `short_users`")
    short_users: Policy = "drop"
    duplicates: Policy = Field("drop", description="repeated (user, item, timestamp) events")
    max_seq_len: int | None = Field(None, ge=1, description="most recent events kept; null: no truncation")
    split: SplitConfig = Field(default_factory=SplitConfig)
    vocab_from: str | None = Field(
        None, description="earlier dataset or exported model: its item indices are kept, new items appended"
    )
    overwrite: bool = False
    rows_per_file: int = Field(100_000, ge=1, description="users per sequences/part-*.parquet file")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by this command")

    @model_validator(mode="after")
    def _check_event_types(self) -> PrepareConfig:
        if self.event_types is not None:
            if self.format not in ("parquet", "csv") or self.columns.event_type is None:
                raise ValueError(
                    "event_types needs the column that holds each event's type: set columns.event_type "
                    "(formats parquet and csv)"
                )
            if not self.event_types:
                raise ValueError(
                    "event_types is empty: list the types to keep, or leave it unset to keep all"
                )
        return self

    @property
    def ids_are_integers(self) -> bool:
        return self.integer_ids if self.integer_ids is not None else self.format == "movielens"
