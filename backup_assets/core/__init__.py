"""The backup core: engines, artifacts, manifests, storage and retention. Never imports dagster."""


class BackupError(RuntimeError):
    """A backup, check or restore that cannot go on; the message names the source and the cause."""
