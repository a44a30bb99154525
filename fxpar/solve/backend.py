"""HiGHS through OR-Tools' MathOpt, behind the few calls of ``pywraplp.Solver`` the ILP makes.

``pywraplp``'s HiGHS interface passes neither a relative nor an absolute gap to HiGHS, which then
stops at its defaults (a relative gap of 1e-4, an absolute gap of 1e-6); MathOpt passes both, so
``Solve`` runs to a proven optimum (gap 0) unless the time limit stops it. HiGHS's MIP search is
deterministic: the same model gives the same solution.
"""

from __future__ import annotations

import datetime
import math

from ortools.linear_solver import pywraplp
from ortools.math_opt.python import mathopt


class _Row:
    __slots__ = ("row",)

    def __init__(self, row):
        self.row = row

    def SetCoefficient(self, var, coef: float) -> None:  # noqa: N802  (pywraplp's names)
        self.row.set_coefficient(var.var, coef)


class _Var:
    __slots__ = ("var", "owner")

    def __init__(self, var, owner: HighsSolver):
        self.var = var
        self.owner = owner

    def SetUb(self, ub: float) -> None:  # noqa: N802
        self.var.upper_bound = ub

    def solution_value(self) -> float:
        return self.owner.values[self.var]


class _Objective:
    def __init__(self, owner: HighsSolver):
        self.owner = owner

    def SetCoefficient(self, var: _Var, coef: float) -> None:  # noqa: N802
        self.owner.model.objective.set_linear_coefficient(var.var, coef)

    def SetMinimization(self) -> None:  # noqa: N802
        self.owner.model.objective.is_maximize = False

    def BestBound(self) -> float:  # noqa: N802
        return self.owner.bound

    def Value(self) -> float:  # noqa: N802
        return self.owner.objective


class HighsSolver:
    """The subset of ``pywraplp.Solver`` that ``fxpar.solve.ilp`` uses, solved by HiGHS to gap 0."""

    def __init__(self):
        self.model = mathopt.Model(name="fxpar")
        self.time_limit_s = math.inf
        self.values: dict = {}
        self.objective = math.nan
        self.bound = -math.inf
        self.output = False
        self._objective = _Objective(self)
        self._num_vars = 0
        self._num_rows = 0

    def infinity(self) -> float:
        return math.inf

    def BoolVar(self, name: str) -> _Var:  # noqa: N802
        self._num_vars += 1
        return _Var(self.model.add_binary_variable(name=name), self)

    def NumVar(self, lb: float, ub: float, name: str) -> _Var:  # noqa: N802
        self._num_vars += 1
        return _Var(self.model.add_variable(lb=lb, ub=ub, name=name), self)

    def Constraint(self, lb: float, ub: float) -> _Row:  # noqa: N802
        self._num_rows += 1
        return _Row(self.model.add_linear_constraint(lb=lb, ub=ub))

    def Objective(self) -> _Objective:  # noqa: N802
        return self._objective

    def NumVariables(self) -> int:  # noqa: N802
        return self._num_vars

    def NumConstraints(self) -> int:  # noqa: N802
        return self._num_rows

    def SetNumThreads(self, num: int) -> bool:  # noqa: N802
        return num == 1  # HiGHS's MIP search runs on one thread

    def SetTimeLimit(self, ms: int) -> None:  # noqa: N802
        self.time_limit_s = ms / 1000

    def EnableOutput(self) -> None:  # noqa: N802
        self.output = True

    def Solve(self, _params=None) -> int:  # noqa: N802
        params = mathopt.SolveParameters(
            time_limit=datetime.timedelta(seconds=self.time_limit_s) if math.isfinite(self.time_limit_s) else None,
            relative_gap_tolerance=0.0,
            absolute_gap_tolerance=0.0,
            random_seed=0,
            enable_output=self.output,
        )
        result = mathopt.solve(self.model, mathopt.SolverType.HIGHS, params=params)
        reason = result.termination.reason
        if reason in (mathopt.TerminationReason.INFEASIBLE, mathopt.TerminationReason.INFEASIBLE_OR_UNBOUNDED):
            return pywraplp.Solver.INFEASIBLE
        if not result.has_primal_feasible_solution():
            return pywraplp.Solver.NOT_SOLVED
        self.values = result.variable_values()
        self.objective = result.objective_value()
        self.bound = result.termination.objective_bounds.dual_bound
        if reason == mathopt.TerminationReason.OPTIMAL:
            self.bound = self.objective if not math.isfinite(self.bound) else self.bound
            return pywraplp.Solver.OPTIMAL
        return pywraplp.Solver.FEASIBLE
