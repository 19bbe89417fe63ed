raise RuntimeError("broken at import")


def handler(event, context):
    return None
