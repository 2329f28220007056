"""Webhooks: where they may go (`addresses`), how their hosts are looked up (`resolver`: bounded
in time, a few threads per tenant), who wants which events (`subscriptions`), how they are
signed (`signing`), and the loop in `ipab api` that delivers the outbox's messages, fairly
between tenants (`delivery`). The outbox itself is the batch layer's
(`scheduler.batches.events`): a status change and its event rows commit together.
"""
