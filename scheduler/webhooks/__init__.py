"""Webhooks: where they may go (`addresses`), who wants which events (`subscriptions`), how they
are signed (`signing`), and the loop in `ipab api` that delivers the outbox's messages
(`delivery`). The outbox itself is the batch layer's (`scheduler.batches.events`): a
status change and its event rows commit together.
"""
