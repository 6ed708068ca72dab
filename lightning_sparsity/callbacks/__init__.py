"""Thin Lightning callbacks, one public class per file."""
