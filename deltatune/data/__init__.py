"""Instruction data: records -> examples of role-tagged segments -> tokens with loss weights."""
