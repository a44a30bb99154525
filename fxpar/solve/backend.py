"""HiGHS through OR-Tools' MathOpt, behind the few calls of ``pywraplp.Solver`` the ILP makes.

``pywraplp``'s HiGHS interface passes neither a relative nor an absolute gap to HiGHS, which then
stops at its defaults (a relative gap of 1e-4, an absolute gap of 1e-6); MathOpt passes both, so
``Solve`` runs to a proven optimum (gap 0) unless the time limit stops it. HiGHS's MIP search is
deterministic: the same model gives the same solution.

The model is held in plain Python lists (variables are indices, a row a dict of coefficients) and
handed to MathOpt's solver as one ``ModelProto`` built at ``Solve``: building it through
``mathopt.Model`` one coefficient at a time took about half of the solve on the toy transformer
(docs/solver-scale.md). ``SetHint`` passes a starting solution (a plan of a forced family) that
HiGHS checks and keeps as its first incumbent. HiGHS's feasibility-jump heuristic is off
(``SKIP_FEASIBILITY_JUMP``), and so is its presolve (``HIGHS_PRESOLVE``); ``HighsSolver(options=...)``
sets any other HiGHS option (the ILP's ``solver="HIGHS:name=value,..."``).
"""

from __future__ import annotations

import datetime
import math
import time

from ortools.linear_solver import pywraplp
from ortools.math_opt import model_parameters_pb2, model_pb2, result_pb2
from ortools.math_opt.core.python import solver as _core
from ortools.math_opt.python import callback, init_arguments, mathopt


SKIP_FEASIBILITY_JUMP = True
# HiGHS's own presolve is off unless an option turns it on ("HIGHS:presolve=on"): after
# fxpar.solve.presolve it removed little and took seconds (HF T5 2x2 11.9 s with it against 6.3 s
# without, the same optimum; every model of the zoo and fxpar/models on 2x2 and 2x4 the same optimum,
# 18 of 22 faster), and on the recomputation ILP it does not stop at the time limit (Llama-70B: 83 s).
HIGHS_PRESOLVE = "off"


class _Row:
    __slots__ = ("coef",)

    def __init__(self):
        self.coef: dict[int, float] = {}

    def SetCoefficient(self, var, coef: float) -> None:  # noqa: N802  (pywraplp's names)
        self.coef[var.index] = coef


class _Var:
    __slots__ = ("index", "owner")

    def __init__(self, index: int, owner: HighsSolver):
        self.index = index
        self.owner = owner

    def SetUb(self, ub: float) -> None:  # noqa: N802
        self.owner.ub[self.index] = ub

    def solution_value(self) -> float:
        return self.owner.values[self.index]


class _Objective:
    def __init__(self, owner: HighsSolver):
        self.owner = owner
        self.coef: dict[int, float] = {}

    def SetCoefficient(self, var: _Var, coef: float) -> None:  # noqa: N802
        self.coef[var.index] = coef

    def SetMinimization(self) -> None:  # noqa: N802
        pass

    def BestBound(self) -> float:  # noqa: N802
        return self.owner.bound

    def Value(self) -> float:  # noqa: N802
        return self.owner.objective


class HighsSolver:
    """The subset of ``pywraplp.Solver`` that ``fxpar.solve.ilp`` uses, solved by HiGHS to gap 0."""

    def __init__(self, options: dict[str, object] | None = None):
        # HiGHS options passed through MathOpt (name -> bool/int/float/str value).
        self.options = dict(options or {})
        self.time_limit_s = math.inf
        self.values: list[float] = []
        self.objective = math.nan
        self.bound = -math.inf
        self.output = False
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[bool] = []
        self.row_lb: list[float] = []
        self.row_ub: list[float] = []
        self.rows: list[_Row] = []
        self.hint: dict[int, float] | None = None
        self._objective = _Objective(self)

    def infinity(self) -> float:
        return math.inf

    def _add(self, lb: float, ub: float, integer: bool) -> _Var:
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(integer)
        return _Var(len(self.lb) - 1, self)

    def BoolVar(self, name: str) -> _Var:  # noqa: N802
        return self._add(0.0, 1.0, True)

    def NumVar(self, lb: float, ub: float, name: str) -> _Var:  # noqa: N802
        return self._add(lb, ub, False)

    def Constraint(self, lb: float, ub: float) -> _Row:  # noqa: N802
        row = _Row()
        self.rows.append(row)
        self.row_lb.append(lb)
        self.row_ub.append(ub)
        return row

    def Objective(self) -> _Objective:  # noqa: N802
        return self._objective

    def NumVariables(self) -> int:  # noqa: N802
        return len(self.lb)

    def NumConstraints(self) -> int:  # noqa: N802
        return len(self.rows)

    def SetNumThreads(self, num: int) -> bool:  # noqa: N802
        return num == 1  # HiGHS's MIP search runs on one thread

    def SetTimeLimit(self, ms: int) -> None:  # noqa: N802
        self.time_limit_s = ms / 1000

    def EnableOutput(self) -> None:  # noqa: N802
        self.output = True

    def SetHint(self, values: dict[_Var, float]) -> None:  # noqa: N802
        """A (complete or partial) solution HiGHS starts from; None values are left out."""
        self.hint = {v.index: x for v, x in values.items()}

    def model_proto(self) -> model_pb2.ModelProto:
        m = model_pb2.ModelProto()
        n = len(self.lb)
        m.variables.ids.extend(range(n))
        m.variables.lower_bounds.extend(self.lb)
        m.variables.upper_bounds.extend(self.ub)
        m.variables.integers.extend(self.integer)
        obj = sorted((i, c) for i, c in self._objective.coef.items() if c)
        m.objective.linear_coefficients.ids.extend(i for i, _ in obj)
        m.objective.linear_coefficients.values.extend(c for _, c in obj)
        m.linear_constraints.ids.extend(range(len(self.rows)))
        m.linear_constraints.lower_bounds.extend(self.row_lb)
        m.linear_constraints.upper_bounds.extend(self.row_ub)
        rows, cols, coefs = [], [], []
        for r, row in enumerate(self.rows):
            items = sorted((i, c) for i, c in row.coef.items() if c)
            rows.extend([r] * len(items))
            cols.extend(i for i, _ in items)
            coefs.extend(c for _, c in items)
        mat = m.linear_constraint_matrix
        mat.row_ids.extend(rows)
        mat.column_ids.extend(cols)
        mat.coefficients.extend(coefs)
        return m

    def Solve(self, _params=None) -> int:  # noqa: N802
        # Building the proto counts against the limit: HiGHS gets what is left (at least 1 ms).
        start = time.perf_counter()
        model = self.model_proto()
        limit = max(1e-3, self.time_limit_s - (time.perf_counter() - start))
        params = mathopt.SolveParameters(
            time_limit=datetime.timedelta(seconds=limit) if math.isfinite(limit) else None,
            relative_gap_tolerance=0.0,
            absolute_gap_tolerance=0.0,
            random_seed=0,
            enable_output=self.output,
        )
        options = dict(self.options)
        if SKIP_FEASIBILITY_JUMP:
            # HiGHS's feasibility-jump heuristic runs before the root LP, which on these models is
            # mostly integral; with a hint it only looks for what it has (docs/solver-scale.md:
            # HF T5 2x2 5.0-5.3 s without it against 6.5 s).
            options.setdefault("mip_heuristic_run_feasibility_jump", False)
        options.setdefault("presolve", HIGHS_PRESOLVE)
        for name, value in options.items():
            kind = {bool: "bool_options", int: "int_options", float: "double_options", str: "string_options"}[type(value)]
            getattr(params.highs, kind)[name] = value
        model_params = model_parameters_pb2.ModelSolveParametersProto()
        if self.hint:
            hint = model_params.solution_hints.add()
            items = sorted(self.hint.items())
            hint.variable_values.ids.extend(i for i, _ in items)
            hint.variable_values.values.extend(x for _, x in items)
        proto = _core.solve(
            model, mathopt.SolverType.HIGHS.value, init_arguments.StreamableSolverInitArguments().to_proto(),
            params.to_proto(), model_params, (lambda lines: print("\n".join(lines), flush=True)) if self.output else None,
            callback.CallbackRegistration().to_proto(), None, None,
        )
        result = result_pb2.SolveResultProto.FromString(proto.SerializeToString()) if not hasattr(proto, "termination") else proto
        reason = result.termination.reason
        if reason in (result_pb2.TERMINATION_REASON_INFEASIBLE, result_pb2.TERMINATION_REASON_INFEASIBLE_OR_UNBOUNDED):
            return pywraplp.Solver.INFEASIBLE
        feasible = [s for s in result.solutions
                    if s.HasField("primal_solution") and s.primal_solution.feasibility_status == 2]  # SOLUTION_STATUS_FEASIBLE
        if not feasible:
            return pywraplp.Solver.NOT_SOLVED
        primal = feasible[0].primal_solution
        values = [0.0] * len(self.lb)
        for i, x in zip(primal.variable_values.ids, primal.variable_values.values):
            values[i] = x
        self.values = values
        self.objective = primal.objective_value
        self.bound = result.termination.objective_bounds.dual_bound
        if reason == result_pb2.TERMINATION_REASON_OPTIMAL:
            self.bound = self.objective if not math.isfinite(self.bound) else self.bound
            return pywraplp.Solver.OPTIMAL
        return pywraplp.Solver.FEASIBLE
