"""Tessel: schedule search for blocks placed on devices (Lin et al., HPCA 2024)."""
