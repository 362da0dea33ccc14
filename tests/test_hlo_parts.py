"""Bytes per part of a step (moma_jax/analysis/hlo_parts.py), on a hand-written program.

Every number below is counted by hand from the shapes (f32 = 4 bytes, bf16 = 2).
"""
from moma_jax.analysis import hlo_parts
from moma_jax.analysis import hlo_stats
from moma_jax.model import names

HLO = f"""HloModule step

%fused_ffn (p: f32[4,8]) -> f32[4,8] {{
  %p = f32[4,8]{{1,0}} parameter(0)
  ROOT %e = f32[4,8]{{1,0}} exponential(%p), metadata={{op_name="ignored_inside_a_fusion"}}
}}

%body (t: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {{
  %t = (s32[], f32[4,8]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4,8]{{1,0}} get-tuple-element(%t), index=1
  %y = f32[4,8]{{1,0}} fusion(%x), kind=kLoop, calls=%fused_ffn, metadata={{op_name="jit(step)/jvp(Decoder)/layer_0/{names.DENSE_FFN}/dot_general"}}
  ROOT %r = (s32[], f32[4,8]{{1,0}}) tuple(%i, %y)
}}

%cond (t: (s32[], f32[4,8])) -> pred[] {{
  %t = (s32[], f32[4,8]{{1,0}}) parameter(0)
  ROOT %c = pred[] constant(true)
}}

ENTRY %main (a: f32[4,8], w: bf16[8,16], mu: f32[4,16]) -> f32[4,16] {{
  %a = f32[4,8]{{1,0}} parameter(0)
  %w = bf16[8,16]{{1,0}} parameter(1)
  %mu = f32[4,16]{{1,0}} parameter(2)
  %relaid = f32[4,16]{{0,1}} copy(%mu), metadata={{op_name="state['opt'][1][0].mu['w']"}}
  %cs = (bf16[8,16]{{1,0}}, bf16[8,16]{{1,0}}, u32[]) copy-start(%w)
  %cd = bf16[8,16]{{1,0}} copy-done(%cs)
  %k = f32[4,16]{{1,0}} custom-call(%a, %cd), custom_call_target="tpu_custom_call", metadata={{op_name="jit(step)/{names.EXPERTS}/{names.EXPERT_FFN}/jit(gmm)/pallas_call"}}, backend_config={{"custom_call_config":{{"cost_estimate":{{"flops":"1024","transcendentals":"0","bytes_accessed":"5000"}}}}}}
  %g = f32[4,16]{{1,0}} gather(%k, %a), metadata={{op_name="jit(step)/jvp(Decoder)/layer_0/{names.EXPERTS}/take"}}
  %s = f32[4,16]{{1,0}} all-reduce(%g), replica_groups={{}}, to_apply=%add, metadata={{op_name="jit(step)/{names.EXPERTS}/psum"}}
  %z = s32[] constant(0)
  %init = (s32[], f32[4,8]{{1,0}}) tuple(%z, %a)
  %loop = (s32[], f32[4,8]{{1,0}}) while(%init), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"3"}}}}
  %o = f32[4,16]{{1,0}} multiply(%s, %relaid), metadata={{op_name="jit(step)/{names.OPTIMIZER}/mul"}}
  %q = f32[4,16]{{1,0}} add(%o, %s), metadata={{op_name="jit(step)/jvp({names.LOSS})/add"}}
  ROOT %n = f32[4,16]{{1,0}} negate(%q), metadata={{op_name="jit(step)/jvp(Decoder)/embed/neg"}}
}}
"""


def test_each_instruction_counts_its_reads_and_writes_in_its_part():
  parts = hlo_parts.bytes_by_part(HLO)
  assert list(parts) == list(hlo_parts.PARTS)
  assert parts == {
      # the loop body's fusion: reads and writes 4x8 f32 (128 + 128), three trips;
      # the kernel's own estimate; the weight's copy (read 256 at its start, write 256
      # at its done), which has no op_name and belongs to its user, the kernel
      'ffn': 3 * 256 + 5000 + 256 + 256,
      'attention': 0,
      # the gather: the rows it reads (its result's size) 256 + indices 128 + result 256
      'routing': 640,
      # the loss's add reads two and writes one 4x16 f32
      'output': 3 * 256,
      # its multiply (3 x 256), and the relayout of a state argument it reads (256 +
      # 256), whose op_name is the argument's name, not a traced scope
      'optimizer': 3 * 256 + 2 * 256,
      'collectives': 2 * 256,
      'rest': 2 * 256,
  }


def test_op_names_map_to_parts_by_scope_segments():
  assert hlo_parts.part_of(f'jit(f)/transpose(jvp(Decoder))/layer_3/{names.EXPERTS}/'
                           f'x._routed/shard_map/{names.EXPERT_FFN}/jit(tgmm)') == 'ffn'
  assert hlo_parts.part_of(f'jit(f)/layer_0/block/{names.ATTENTION}/query') == 'attention'
  assert hlo_parts.part_of(f'jit(f)/layer_1/{names.ROUTING}/gather') == 'routing'
  assert hlo_parts.part_of('jit(f)/jvp(Decoder)/embed/take') == 'rest'
  # A scope entered first under a transformation is wrapped in it.
  assert hlo_parts.part_of(f'jit(f)/transpose(jvp({names.LOSS}))/add_any') == 'output'
  # A segment is matched whole: 'routing_table' is no routing scope.
  assert hlo_parts.part_of('jit(f)/routing_table/add') == 'rest'


def test_the_remainder_completes_the_cost_analysis_total():
  parts = hlo_parts.with_remainder({'ffn': 10, 'rest': 5}, 40.0)
  assert parts == {'ffn': 10, 'rest': 5, 'unattributed': 25}


FUSIONS = f"""HloModule fusions

%fused_mix (p0: f32[8,8], p1: f32[8], p2: s32[]) -> (f32[2,8], f32[8,8]) {{
  %p0 = f32[8,8]{{1,0}} parameter(0)
  %p1 = f32[8]{{0}} parameter(1)
  %p2 = s32[] parameter(2)
  %top = f32[2,8]{{1,0}} slice(%p0), slice={{[0:2], [0:8]}}
  %row = f32[1,8]{{1,0}} dynamic-slice(%p0, %p2, %p2), dynamic_slice_sizes={{1,8}}
  %bias = f32[2,8]{{1,0}} broadcast(%p1), dimensions={{1}}
  %grid = f32[2,4]{{1,0}} reshape(%p1)
  %exp = f32[8,8]{{1,0}} exponential(%p0)
  %neg = f32[8,8]{{1,0}} negate(%p0)
  %sum = f32[8,8]{{1,0}} add(%exp, %neg)
  %out0 = f32[2,8]{{1,0}} add(%top, %bias)
  %out1 = f32[8,8]{{1,0}} dynamic-update-slice(%sum, %row, %p2, %p2)
  ROOT %t = (f32[2,8]{{1,0}}, f32[8,8]{{1,0}}) tuple(%out0, %out1)
}}

%inner (q0: f32[8,8]) -> f32[2,8] {{
  %q0 = f32[8,8]{{1,0}} parameter(0)
  ROOT %q1 = f32[2,8]{{1,0}} slice(%q0), slice={{[2:4], [0:8]}}
}}

%outer (r0: f32[8,8]) -> f32[2,8] {{
  %r0 = f32[8,8]{{1,0}} parameter(0)
  %f = f32[2,8]{{1,0}} fusion(%r0), kind=kLoop, calls=%inner
  ROOT %m = f32[2,8]{{1,0}} multiply(%f, %f)
}}

ENTRY %main (a: f32[8,8], b: f32[8], i: s32[], rows: s32[2,1]) -> f32[2,8] {{
  %a = f32[8,8]{{1,0}} parameter(0)
  %b = f32[8]{{0}} parameter(1)
  %i = s32[] parameter(2)
  %rows = s32[2,1]{{1,0}} parameter(3)
  %picked = f32[2,8]{{1,0}} gather(%a, %rows), offset_dims={{1}}, collapsed_slice_dims={{0}}, start_index_map={{0}}, index_vector_dim=1, slice_sizes={{1,8}}, metadata={{op_name="jit(step)/layer_0/{names.EXPERTS}/take"}}
  %mix = (f32[2,8]{{1,0}}, f32[8,8]{{1,0}}) fusion(%a, %b, %i), kind=kLoop, calls=%fused_mix, metadata={{op_name="jit(step)/layer_0/{names.ROUTING}/gather"}}
  ROOT %o = f32[2,8]{{1,0}} fusion(%a), kind=kLoop, calls=%outer, metadata={{op_name="jit(step)/layer_0/{names.ATTENTION}/mul"}}
}}
"""


def test_a_fusion_reads_its_parameters_as_the_cost_analysis_counts_them():
  parts = hlo_parts.bytes_by_part(FUSIONS)
  # %mix reads p0 through a slice (2x8 f32, 64), a dynamic-slice (1x8, 32) and, once for
  # both elementwise users, whole (256); p1 once per broadcast and reshape (32 + 32); the
  # index p2 whole once per user (4 + 4). It writes out0 (64) and, in place, only the
  # 1x8 update of out1 (32).
  # The gather reads the 2 rows it picks (64) of `a`, not all 8, and its indices (8),
  # and writes them (64).
  assert parts['routing'] == ((64 + 32 + 256) + (32 + 32) + (4 + 4) + (64 + 32)
                              + (64 + 8 + 64))
  # %outer reads its parameter only through the nested fusion's slice (64), writes 64.
  assert parts['attention'] == 64 + 64
  assert sum(parts.values()) == parts['routing'] + parts['attention']


SPACES = f"""HloModule spaces

%fused_add (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {{
  %p0 = f32[8,8]{{1,0:T(8,128)S(1)}} parameter(0)
  %p1 = f32[8,8]{{1,0:T(8,128)}} parameter(1)
  ROOT %s = f32[8,8]{{1,0:T(8,128)}} add(%p0, %p1)
}}

ENTRY %main (a: f32[8,8], b: f32[8,8]) -> f32[8,8] {{
  %a = f32[8,8]{{1,0:T(8,128)}} parameter(0)
  %b = f32[8,8]{{1,0:T(8,128)}} parameter(1)
  %cs = (f32[8,8]{{1,0:T(8,128)S(1)}}, f32[8,8]{{1,0:T(8,128)}}, u32[]{{:S(2)}}) copy-start(%a)
  %cd = f32[8,8]{{1,0:T(8,128)S(1)}} copy-done(%cs)
  ROOT %f = f32[8,8]{{1,0:T(8,128)}} fusion(%cd, %b), kind=kLoop, calls=%fused_add, metadata={{op_name="jit(step)/{names.OPTIMIZER}/add"}}
}}
"""


def test_hbm_only_leaves_out_what_the_compiler_keeps_on_the_chip():
  every = hlo_parts.bytes_by_part(SPACES)
  # The prefetch of `a` into VMEM reads 256 at its start and writes 256 at its done;
  # the fusion reads both operands and writes its result, 3 x 256.
  assert every['optimizer'] == 256 + 256 + 3 * 256 and sum(every.values()) == 5 * 256
  hbm = hlo_parts.bytes_by_part(SPACES, hbm_only=True)
  # In HBM: the prefetch's read of `a`, the fusion's read of `b` and its write; the
  # VMEM copy's write and the fusion's read of it stay on the chip. Each as laid out:
  # an 8 x 8 f32 array in (8, 128) tiles takes 8 x 128 floats.
  assert hbm['optimizer'] == 3 * 8 * 128 * 4 and sum(hbm.values()) == hbm['optimizer']


def test_an_array_in_hbm_takes_its_tiles():
  assert hlo_stats.hbm_shape_bytes('f32[8,8]{1,0:T(8,128)}') == 8 * 128 * 4
  # Physical order first: {0,1} puts the 300 axis minor (300 -> 384), 3 -> 8.
  assert hlo_stats.hbm_shape_bytes('bf16[300,3]{0,1:T(8,128)(2,1)}') == 8 * 384 * 2
  assert hlo_stats.hbm_shape_bytes('f32[]{:T(128)}') == 128 * 4
  assert hlo_stats.hbm_shape_bytes('s32[5]{0:T(1024)}') == 1024 * 4
  assert hlo_stats.hbm_shape_bytes('f32[3,5]{1,0}') == hlo_stats.hbm_shape_bytes('f32[3,5]') == 60
  # Elsewhere (VMEM, SMEM): none; a tuple: its elements in HBM.
  assert hlo_stats.hbm_shape_bytes(
      '(f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)})') == 4096


IN_PLACE = f"""HloModule in_place

%add (x: f32[], y: f32[]) -> f32[] {{
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}}

ENTRY %main (buf: f32[8,8], rows: f32[2,8], i: s32[], idx: s32[2,1], off: s32[4]) -> f32[8,8] {{
  %buf = f32[8,8]{{1,0}} parameter(0)
  %rows = f32[2,8]{{1,0}} parameter(1)
  %i = s32[] parameter(2)
  %idx = s32[2,1]{{1,0}} parameter(3)
  %off = s32[4]{{0}} parameter(4)
  %u = f32[8,8]{{1,0}} dynamic-update-slice(%buf, %rows, %i, %i), metadata={{op_name="jit(step)/{names.EXPERTS}/dus"}}
  %sc = f32[8,8]{{1,0}} scatter(%u, %idx, %rows), update_window_dims={{1}}, inserted_window_dims={{0}}, scatter_dims_to_operand_dims={{0}}, index_vector_dim=1, to_apply=%add, metadata={{op_name="jit(step)/{names.EXPERTS}/scatter-add"}}
  ROOT %x = f32[8,8]{{1,0}} ragged-all-to-all(%rows, %sc, %off, %off, %off, %off), replica_groups={{{{0,1,2,3}}}}
}}
"""


def test_an_update_in_place_counts_what_it_writes_not_its_whole_buffer():
  parts = hlo_parts.bytes_by_part(IN_PLACE)
  # dynamic-update-slice: reads the 2x8 update (64) and two indices (4 + 4), writes 64;
  # scatter: reads indices (8) and updates (64), writes 64.
  assert parts['routing'] == (64 + 8 + 64) + (8 + 64 + 64)
  # The all-to-all reads what it sends (64) and four offset arrays (4 x 16), and writes
  # at most its result (256), not reading the output buffer it updates.
  assert parts['collectives'] == 64 + 4 * 16 + 256
