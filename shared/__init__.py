"""Code shared by the scheduler and the worker: settings, the job spec, SQL, storage, errors.

Nothing here imports torch or diffusers, so the scheduler stays light.
"""
