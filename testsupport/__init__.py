"""Test support loaded as a pytest plugin (``-p testsupport.models`` in pyproject.toml).

It lives outside ``tests/`` on purpose: a conftest in ``tests/`` would put ``tests/`` on
sys.path, where ``import qcrun`` finds the test folder ``tests/qcrun`` instead of the package.
"""
