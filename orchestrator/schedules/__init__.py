"""Scheduled sweeps (../shared/SCHEDULING.md): when slots fall, and the ledger of each slot."""
