"""Baseline: the schema of node/db.py and the counting triggers of node/counters.py before Alembic.

Revision ID: 0001
Revises:
Create Date: 2026-12-06

A database made before Alembic (these tables, no ``alembic_version``) is checked against this
revision and stamped at it (:func:`node.schema.adopt`) instead of running it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from node import counters

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('instances',
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('position', sa.Float(), nullable=True),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('peer', sa.String(length=64), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('expected', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('sop_instance_uid')
    )
    op.create_index(op.f('ix_instances_series_uid'), 'instances', ['series_uid'], unique=False)
    op.create_index(op.f('ix_instances_study_uid'), 'instances', ['study_uid'], unique=False)
    op.create_table('jobs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('route', sa.String(length=64), nullable=False),
    sa.Column('pipeline', sa.String(length=64), nullable=False),
    sa.Column('inputs', sa.JSON(), nullable=False),
    sa.Column('input_key', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('not_before', sa.Float(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('lease_until', sa.Float(), nullable=True),
    sa.Column('worker', sa.String(length=64), nullable=False),
    sa.Column('last_image_at', sa.Float(), nullable=True),
    sa.Column('result_dir', sa.Text(), nullable=False),
    sa.Column('summary', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('pipeline', 'input_key', name='uq_job_input')
    )
    op.create_index('ix_jobs_finished_at', 'jobs', ['finished_at'], unique=False)
    op.create_index(op.f('ix_jobs_series_uid'), 'jobs', ['series_uid'], unique=False)
    op.create_index(op.f('ix_jobs_state'), 'jobs', ['state'], unique=False)
    op.create_index('ix_jobs_state_not_before', 'jobs', ['state', 'not_before'], unique=False)
    op.create_index(op.f('ix_jobs_study_uid'), 'jobs', ['study_uid'], unique=False)
    op.create_table('series',
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('instances', sa.Integer(), nullable=False),
    sa.Column('expected', sa.Integer(), nullable=True),
    sa.Column('first_received', sa.Float(), nullable=False),
    sa.Column('last_received', sa.Float(), nullable=False),
    sa.Column('completed_at', sa.Float(), nullable=True),
    sa.Column('completion_reason', sa.String(length=32), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('series_uid')
    )
    op.create_index('ix_series_completed_at', 'series', ['completed_at'], unique=False)
    op.create_index(op.f('ix_series_state'), 'series', ['state'], unique=False)
    op.create_index(op.f('ix_series_study_uid'), 'series', ['study_uid'], unique=False)
    op.create_table('state_counts',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('sweeps',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('date_from', sa.String(length=8), nullable=False),
    sa.Column('date_to', sa.String(length=8), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('dry_run', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('exports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.Float(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('sent_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'destination', 'sop_instance_uid', name='uq_export')
    )
    op.create_index(op.f('ix_exports_job_id'), 'exports', ['job_id'], unique=False)
    op.create_index(op.f('ix_exports_state'), 'exports', ['state'], unique=False)
    op.create_table('results',
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('source_series_uid', sa.String(length=64), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('pipeline', sa.String(length=64), nullable=False),
    sa.Column('supersedes', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('in_pacs_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('sop_instance_uid')
    )
    op.create_index('ix_results_in_pacs_at', 'results', ['in_pacs_at'], unique=False)
    op.create_index(op.f('ix_results_job_id'), 'results', ['job_id'], unique=False)
    op.create_index(op.f('ix_results_source_series_uid'), 'results', ['source_series_uid'], unique=False)
    op.create_index(op.f('ix_results_study_uid'), 'results', ['study_uid'], unique=False)
    op.create_table('sweep_items',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sweep_id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('instances', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['sweep_id'], ['sweeps.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sweep_id', 'series_uid', name='uq_sweep_item')
    )
    op.create_index(op.f('ix_sweep_items_sweep_id'), 'sweep_items', ['sweep_id'], unique=False)

    # the counts by state kept by triggers (node.counters: made, filled and marked with its VERSION)
    counters.install_on(op.get_bind())


def downgrade() -> None:
    op.drop_index(op.f('ix_sweep_items_sweep_id'), table_name='sweep_items')
    op.drop_table('sweep_items')
    op.drop_index(op.f('ix_results_study_uid'), table_name='results')
    op.drop_index(op.f('ix_results_source_series_uid'), table_name='results')
    op.drop_index(op.f('ix_results_job_id'), table_name='results')
    op.drop_index('ix_results_in_pacs_at', table_name='results')
    op.drop_table('results')
    op.drop_index(op.f('ix_exports_state'), table_name='exports')
    op.drop_index(op.f('ix_exports_job_id'), table_name='exports')
    op.drop_table('exports')
    op.drop_table('sweeps')
    op.drop_table('state_counts')
    op.drop_index(op.f('ix_series_study_uid'), table_name='series')
    op.drop_index(op.f('ix_series_state'), table_name='series')
    op.drop_index('ix_series_completed_at', table_name='series')
    op.drop_table('series')
    op.drop_index(op.f('ix_jobs_study_uid'), table_name='jobs')
    op.drop_index('ix_jobs_state_not_before', table_name='jobs')
    op.drop_index(op.f('ix_jobs_state'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_series_uid'), table_name='jobs')
    op.drop_index('ix_jobs_finished_at', table_name='jobs')
    op.drop_table('jobs')
    op.drop_index(op.f('ix_instances_study_uid'), table_name='instances')
    op.drop_index(op.f('ix_instances_series_uid'), table_name='instances')
    op.drop_table('instances')

    if op.get_bind().dialect.name == "postgresql":
        for table in counters.FIGURES:
            op.execute(f"DROP FUNCTION IF EXISTS prognode_count_{table}()")
