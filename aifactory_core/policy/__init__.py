"""Tenant policy: the policy file, the admission decision, ACLs, apply, admission hook, accounting.

Importing this package loads nothing; each module imports what it needs.
"""
