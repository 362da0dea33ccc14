"""Bytes per part of a step (moma_jax/analysis/hlo_parts.py), on a hand-written program.

Every number below is counted by hand from the shapes (f32 = 4 bytes, bf16 = 2).
"""
from moma_jax.analysis import hlo_parts
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

ENTRY %main (a: f32[4,8], w: bf16[8,16]) -> f32[4,16] {{
  %a = f32[4,8]{{1,0}} parameter(0)
  %w = bf16[8,16]{{1,0}} parameter(1)
  %cs = (bf16[8,16]{{1,0}}, bf16[8,16]{{1,0}}, u32[]) copy-start(%w)
  %cd = bf16[8,16]{{1,0}} copy-done(%cs)
  %k = f32[4,16]{{1,0}} custom-call(%a, %cd), custom_call_target="tpu_custom_call", metadata={{op_name="jit(step)/{names.EXPERTS}/{names.EXPERT_FFN}/jit(gmm)/pallas_call"}}, backend_config={{"custom_call_config":{{"cost_estimate":{{"flops":"1024","transcendentals":"0","bytes_accessed":"5000"}}}}}}
  %g = f32[4,16]{{1,0}} gather(%k, %a), metadata={{op_name="jit(step)/jvp(Decoder)/layer_0/{names.EXPERTS}/take"}}
  %s = f32[4,16]{{1,0}} all-reduce(%g), replica_groups={{}}, to_apply=%add, metadata={{op_name="jit(step)/{names.EXPERTS}/psum"}}
  %z = s32[] constant(0)
  %init = (s32[], f32[4,8]{{1,0}}) tuple(%z, %a)
  %loop = (s32[], f32[4,8]{{1,0}}) while(%init), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"3"}}}}
  %o = f32[4,16]{{1,0}} multiply(%s, %s), metadata={{op_name="jit(step)/{names.OPTIMIZER}/mul"}}
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
      # the gather: operand 256 + indices 128 + result 256
      'routing': 640,
      # the loss's add reads two and writes one 4x16 f32
      'output': 3 * 256,
      'optimizer': 3 * 256,
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
