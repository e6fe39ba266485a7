"""Exact rectangular assignment in the graph: shortest augmenting paths (Jonker-Volgenant).

The algorithm of scipy's `linear_sum_assignment` (Crouse 2016): rows are added one at a time,
each by a Dijkstra search over the columns on reduced costs, then an augmentation along the path
found; dual potentials keep the reduced costs non-negative. Only the rows marked valid are
added, so a padded problem costs what its real rows cost: with a handful of real targets among
100 slots, a few dozen vector steps instead of the thousands a dense Hungarian loop takes.
vmap batches problems (the loops then run until every problem is done).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class _Duals(NamedTuple):
  """The solver's state between rows."""
  row_potential: jax.Array  # float32 [n]
  column_potential: jax.Array  # float32 [m]
  column_of_row: jax.Array  # int32 [n], -1 = unassigned
  row_of_column: jax.Array  # int32 [m], -1 = unassigned


class _Search(NamedTuple):
  """One Dijkstra search from a new row to a free column."""
  row: jax.Array  # int32 [], the row being scanned
  lowest: jax.Array  # float32 [], distance of the last column reached
  distance: jax.Array  # float32 [m], shortest reduced-cost distance of each column
  previous_row: jax.Array  # int32 [m], row before each column on its shortest path
  rows_seen: jax.Array  # bool [n]
  columns_seen: jax.Array  # bool [m]
  sink: jax.Array  # int32 [], the free column reached, -1 while searching
  steps: jax.Array  # int32 []


def _search(cost: jax.Array, columns_valid: jax.Array, duals: _Duals, start: jax.Array) -> _Search:
  """Shortest path from row `start` to an unassigned valid column over reduced costs."""
  n, m = cost.shape

  def searching(s: _Search) -> jax.Array:
    return (s.sink < 0) & (s.steps < m)

  def scan_row(s: _Search) -> _Search:
    reduced = (s.lowest + cost[s.row] - duals.row_potential[s.row] - duals.column_potential)
    shorter = ~s.columns_seen & (reduced < s.distance)
    distance = jnp.where(shorter, reduced, s.distance)
    previous_row = jnp.where(shorter, s.row, s.previous_row)
    open_distance = jnp.where(s.columns_seen | ~columns_valid, jnp.inf, distance)
    lowest = jnp.min(open_distance)
    # Among the nearest columns prefer a free one: the search then ends at once.
    free_nearest = (open_distance == lowest) & (duals.row_of_column < 0)
    column = jnp.where(jnp.any(free_nearest), jnp.argmax(free_nearest),
                       jnp.argmin(open_distance)).astype(jnp.int32)
    owner = duals.row_of_column[column]
    return _Search(row=jnp.maximum(owner, 0), lowest=lowest, distance=distance,
                   previous_row=previous_row, rows_seen=s.rows_seen.at[s.row].set(True),
                   columns_seen=s.columns_seen.at[column].set(True),
                   sink=jnp.where(owner < 0, column, -1), steps=s.steps + 1)

  first = _Search(row=start, lowest=jnp.float32(0.0), distance=jnp.full(m, jnp.inf, jnp.float32),
                  previous_row=jnp.full(m, -1, jnp.int32), rows_seen=jnp.zeros(n, bool),
                  columns_seen=jnp.zeros(m, bool), sink=jnp.int32(-1), steps=jnp.int32(0))
  return jax.lax.while_loop(searching, scan_row, first)


def _add_row(cost: jax.Array, columns_valid: jax.Array, duals: _Duals, start: jax.Array) -> _Duals:
  """Assigns row `start`, re-routing earlier rows along the shortest augmenting path."""
  found = _search(cost, columns_valid, duals, start)
  assigned = jnp.maximum(duals.column_of_row, 0)
  row_shift = jnp.where(found.rows_seen, found.lowest - found.distance[assigned], 0.0)
  row_potential = duals.row_potential + row_shift.at[start].set(found.lowest)
  column_potential = duals.column_potential - jnp.where(
      found.columns_seen, found.lowest - found.distance, 0.0)

  def augmenting(carry):
    return carry[0] >= 0

  def flip_edge(carry):
    """Gives `column` to the row before it on the path; continues with that row's old column."""
    column, column_of_row, row_of_column = carry
    row = found.previous_row[column]
    next_column = jnp.where(row == start, -1, column_of_row[row])
    return (next_column, column_of_row.at[row].set(column),
            row_of_column.at[column].set(row))

  _, column_of_row, row_of_column = jax.lax.while_loop(
      augmenting, flip_edge, (found.sink, duals.column_of_row, duals.row_of_column))
  return _Duals(row_potential, column_potential, column_of_row, row_of_column)


def assign_rows(cost: jax.Array, rows_valid: jax.Array, columns_valid: jax.Array) -> jax.Array:
  """Minimum-cost assignment of every valid row to a distinct valid column.

  Args:
    cost: float32 [n, m], finite.
    rows_valid: bool [n]; invalid rows are left out of the problem.
    columns_valid: bool [m]; invalid columns are never assigned. There must be at least as many
      valid columns as valid rows.

  Returns:
    int32 [n]: the column of each valid row, -1 for the invalid rows.
  """
  n, m = cost.shape
  cost = cost.astype(jnp.float32)
  order = jnp.argsort(~rows_valid, stable=True).astype(jnp.int32)  # the valid rows first
  start = _Duals(jnp.zeros(n, jnp.float32), jnp.zeros(m, jnp.float32),
                 jnp.full(n, -1, jnp.int32), jnp.full(m, -1, jnp.int32))
  solved = jax.lax.fori_loop(0, jnp.sum(rows_valid, dtype=jnp.int32),
                             lambda k, duals: _add_row(cost, columns_valid, duals, order[k]),
                             start)
  return solved.column_of_row
