"""A Python function with a PyPI dependency.

`python-slugify` (and its own dependency, `text-unidecode`) is listed in
requirements.txt beside this file; `supervisor deps` installs it into this
function's own directory (`.python_packages`), which comes first on its
workers' sys.path. Nothing is installed into the supervisor's environment.
"""

import json

from slugify import slugify


def handler(event: bytes, context):
    text = json.loads(event or b"{}").get("text", "Hello, World!")
    context.logger.info("slugify", length=len(text))
    return {"slug": slugify(text), "request_id": context.request_id}
