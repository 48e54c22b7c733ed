"""Chat templates of the built-in models, written for this project.

Each is a Jinja template in the Hugging Face convention: it sees ``messages`` (dicts with ``role``,
``content``, optionally ``tool_calls``), ``add_generation_prompt``, ``bos_token`` / ``eos_token`` and
``tools`` (JSON schemas or None), and is rendered with ``trim_blocks`` and ``lstrip_blocks``.

* ``LLAMA3_TEMPLATE``  -- the Llama-3 header format: ``<|start_header_id|>role<|end_header_id|>\\n\\n
  text<|eot_id|>``, BOS first; tool results use the ``ipython`` role as Llama 3.1 does.
* ``CHATML_TEMPLATE``  -- ChatML as the Qwen models use it: ``<|im_start|>role\\ntext<|im_end|>\\n``;
  tools go into the system turn inside ``<tools></tools>``, calls into ``<tool_call>`` tags and tool
  results into ``<tool_response>`` tags of a user turn.
* ``MISTRAL_TEMPLATE`` -- the ``[INST] ... [/INST]`` format; the system prompt is put in front of the last
  user turn and tools in ``[AVAILABLE_TOOLS]`` right before it.

Message content may be a string or a list of OpenAI-style parts; the text parts are joined.
Tool-call ``arguments`` may be a dict or an already-serialised JSON string (the OpenAI API sends strings).
"""

from __future__ import annotations

# Shared macros, prepended to every template. `text_of` flattens content; `args_json` writes call
# arguments as JSON whether they arrive as a mapping or as a JSON string.
_MACROS = r"""
{%- macro text_of(content) -%}
    {%- if content is none -%}
    {%- elif content is string -%}
        {{- content -}}
    {%- elif content is mapping -%}
        {{- content | tojson -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro args_json(arguments) -%}
    {%- if arguments is string -%}
        {{- arguments -}}
    {%- else -%}
        {{- arguments | tojson -}}
    {%- endif -%}
{%- endmacro -%}
"""

LLAMA3_TEMPLATE = _MACROS + r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_text = text_of(messages[0]['content']) | trim -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system_text = '' -%}
    {%- set rest = messages -%}
{%- endif -%}
{%- if tools -%}
    {%- set tool_text = 'You can call the functions described below. To call one, reply with only a JSON object '
        + 'of the form {"name": function name, "parameters": object of arguments}.' -%}
    {%- for tool in tools -%}
        {%- set tool_text = tool_text + '\n\n' + (tool | tojson(indent=4)) -%}
    {%- endfor -%}
    {%- if system_text -%}
        {%- set system_text = system_text + '\n\n' + tool_text -%}
    {%- else -%}
        {%- set system_text = tool_text -%}
    {%- endif -%}
{%- endif -%}
{%- if system_text -%}
    {{- '<|start_header_id|>system<|end_header_id|>\n\n' + system_text + '<|eot_id|>' -}}
{%- endif -%}
{%- for message in rest -%}
    {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}
    {{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' -}}
    {%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}
        {%- if message['content'] is defined -%}
            {{- text_of(message['content']) | trim -}}
        {%- endif -%}
        {%- for tool_call in message['tool_calls'] -%}
            {%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call -%}
            {{- '{"name": ' + (call['name'] | tojson) + ', "parameters": ' + args_json(call['arguments']) + '}' -}}
        {%- endfor -%}
    {%- elif message['content'] is defined -%}
        {{- text_of(message['content']) | trim -}}
    {%- endif -%}
    {{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

CHATML_TEMPLATE = _MACROS + r"""
{%- set has_system = messages and messages[0]['role'] == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if has_system -%}
        {{- text_of(messages[0]['content']) + '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou may call functions to answer. Their signatures are listed in <tools></tools>:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nTo call one, write a JSON object with its name and arguments inside <tool_call></tool_call>:\n'
        + '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
    {{- '<|im_start|>system\n' + text_of(messages[0]['content']) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if loop.first and has_system -%}
        {#- the system turn is written above -#}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if message['content'] is defined -%}
            {{- text_of(message['content']) -}}
        {%- endif -%}
        {%- if message['tool_calls'] is defined and message['tool_calls'] -%}
            {%- for tool_call in message['tool_calls'] -%}
                {%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call -%}
                {%- if not loop.first or (message['content'] is defined and message['content']) -%}
                    {{- '\n' -}}
                {%- endif -%}
                {{- '<tool_call>\n{"name": ' + (call['name'] | tojson) + ', "arguments": '
                    + args_json(call['arguments']) + '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {#- consecutive tool results share one user turn -#}
        {%- if loop.first or loop.previtem['role'] != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + text_of(message['content']) + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem['role'] != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '\n' + text_of(message['content']) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

MISTRAL_TEMPLATE = _MACROS + r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_text = text_of(messages[0]['content']) -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system_text = '' -%}
    {%- set rest = messages -%}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for message in rest -%}
    {%- if message['role'] == 'user' -%}
        {%- set ns.last_user = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- for message in rest -%}
    {%- if message['role'] == 'user' -%}
        {%- if tools and loop.index0 == ns.last_user -%}
            {{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}
        {%- endif -%}
        {%- if system_text and loop.index0 == ns.last_user -%}
            {{- '[INST] ' + system_text + '\n\n' + text_of(message['content']) + '[/INST]' -}}
        {%- else -%}
            {{- '[INST] ' + text_of(message['content']) + '[/INST]' -}}
        {%- endif -%}
    {%- elif message['role'] == 'assistant' -%}
        {%- if message['tool_calls'] is defined and message['tool_calls'] -%}
            {{- '[TOOL_CALLS] [' -}}
            {%- for tool_call in message['tool_calls'] -%}
                {%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call -%}
                {{- '{"name": ' + (call['name'] | tojson) + ', "arguments": ' + args_json(call['arguments']) + '}' -}}
                {%- if not loop.last -%}
                    {{- ', ' -}}
                {%- endif -%}
            {%- endfor -%}
            {{- ']' + eos_token -}}
        {%- else -%}
            {{- ' ' + text_of(message['content']) + eos_token -}}
        {%- endif -%}
    {%- elif message['role'] == 'tool' -%}
        {{- '[TOOL_RESULTS] {"content": ' + (text_of(message['content']) | tojson) + '}[/TOOL_RESULTS]' -}}
    {%- else -%}
        {{- raise_exception('the mistral chat format has no role ' + message['role'] + '; use system, user, '
            + 'assistant or tool') -}}
    {%- endif -%}
{%- endfor -%}
"""

TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "mistral": MISTRAL_TEMPLATE}


def template_for(family_name: str) -> str:
    """The chat template of a tokenizer family (see worker.models.demo_tokenizer.FAMILIES)."""
    try:
        return TEMPLATES[family_name]
    except KeyError:
        raise ValueError(f"no chat template for family {family_name!r}; known: {', '.join(sorted(TEMPLATES))}") from None
