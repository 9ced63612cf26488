"""schemathesis hooks for scripts/fuzz-api.sh: `POST /datasets` takes NDJSON text."""
import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    return value if isinstance(value, bytes) else str(value).encode("utf-8")
