"""The rating database's tables and the migrations that create and evolve them.

Schema versions live in the `schema_version` table (one row). `MIGRATIONS[i]` takes a database
from version i to i + 1; `store.Store` runs the missing ones in the transaction that records the
new version. Released migrations are never edited, only appended to.

Tables: raters (hashed login tokens, admin and simulated flags, the weight the Selector trainer
gives them), candidates (one generated image: path relative to the media root, prompt, seed,
model step, run; the phantom truth when known), ratings (1-5 score, accept/reject, criterion
flags as JSON; unique per rater and client request id), pairwise (a/b/tie preferences, same
idempotency key), meta (settings such as the media root).
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

CRITERIA = ("optic_disc_clarity", "vessel_structure", "contrast_illumination", "artifacts",
            "prompt_match")
PREFERENCES = ("a", "b", "tie")
MAX_REQUEST_ID = 128  # characters; request ids are client-made UUIDs or similar

metadata = sa.MetaData()
schema_version = sa.Table("schema_version", metadata,
                          sa.Column("version", sa.Integer, nullable=False))
meta = sa.Table("meta", metadata, sa.Column("key", sa.String(64), primary_key=True),
                sa.Column("value", sa.Text, nullable=False))
raters = sa.Table(
    "raters", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("is_simulated", sa.Boolean, nullable=False, default=False),
    sa.Column("weight", sa.Float, nullable=False, default=1.0),
    sa.Column("created", sa.DateTime, nullable=False))
candidates = sa.Table(
    "candidates", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("path", sa.String(1000), nullable=False),  # relative to the media root
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("seed", sa.BigInteger),
    sa.Column("model_step", sa.BigInteger),
    sa.Column("labels", sa.Text),  # FundusLabels JSON when the truth is known (phantom)
    sa.Column("created", sa.DateTime, nullable=False),
    sa.UniqueConstraint("run_id", "path"))
ratings = sa.Table(
    "ratings", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("candidate_id", sa.Integer, sa.ForeignKey("candidates.id"), nullable=False,
              index=True),
    sa.Column("rater_id", sa.Integer, sa.ForeignKey("raters.id"), nullable=False, index=True),
    sa.Column("score", sa.Integer),
    sa.Column("accept", sa.Boolean),
    sa.Column("criteria", sa.Text, nullable=False),  # JSON {criterion: bool}
    sa.Column("request_id", sa.String(MAX_REQUEST_ID), nullable=False),
    sa.Column("created", sa.DateTime, nullable=False),
    sa.UniqueConstraint("rater_id", "request_id"),
    sa.CheckConstraint("score IS NULL OR (score >= 1 AND score <= 5)", name="score_range"))
pairwise = sa.Table(
    "pairwise", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("candidate_a", sa.Integer, sa.ForeignKey("candidates.id"), nullable=False),
    sa.Column("candidate_b", sa.Integer, sa.ForeignKey("candidates.id"), nullable=False),
    sa.Column("preferred", sa.String(3), nullable=False),
    sa.Column("rater_id", sa.Integer, sa.ForeignKey("raters.id"), nullable=False),
    sa.Column("request_id", sa.String(MAX_REQUEST_ID), nullable=False),
    sa.Column("created", sa.DateTime, nullable=False),
    sa.UniqueConstraint("rater_id", "request_id"),
    sa.CheckConstraint("preferred IN ('a', 'b', 'tie')", name="preferred_choice"))
_V1_TABLES = [meta, raters, candidates, ratings, pairwise]


def _migrate_v0_to_v1(conn: sa.Connection) -> None:
  metadata.create_all(conn, tables=_V1_TABLES)


# One function per schema version step; append, never edit, once released.
MIGRATIONS: tuple[Callable[[sa.Connection], None], ...] = (_migrate_v0_to_v1,)
