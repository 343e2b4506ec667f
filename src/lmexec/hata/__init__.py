"""HATA: hash-aware top-k attention for LLM decoding (Gong et al., ACL Findings 2025)."""
