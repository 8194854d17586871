"""The data plane: the Celery task, data materialisation and the training engines."""
