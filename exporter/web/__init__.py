"""HTTP blueprints, one per concern; the factory registers every entry of BLUEPRINTS."""

from .api import bp as api_bp
from .ingest import bp as ingest_bp
from .openapi import bp as openapi_bp
from .ops import bp as ops_bp
from .page import bp as page_bp
from .sql import bp as sql_bp

BLUEPRINTS = [ingest_bp, ops_bp, sql_bp, page_bp, api_bp, openapi_bp]
