"""OMOP CDM access: the omop-cdm ORM's tables on SQLite (embedded) or PostgreSQL (site database)."""

from fedtwin.omop.database import OmopDatabase, open_database
from fedtwin.omop.loader import LoadReport, load_omop_csv
from fedtwin.omop.schema import FEDTWIN_TABLES, cdm_table, cdm_tables

__all__ = ["OmopDatabase", "open_database", "FEDTWIN_TABLES", "cdm_table", "cdm_tables", "LoadReport", "load_omop_csv"]
