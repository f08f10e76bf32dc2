"""ftune's chat-template interpreter against transformers' own jinja2 environment.

Every case is rendered once by render_template_tool (all cases in one process) and once by the
template compiled with transformers.utils.chat_template_utils._compile_jinja_template (the
function apply_chat_template uses: sandboxed jinja2, trim_blocks, lstrip_blocks, loopcontrols,
raise_exception, strftime_now, json.dumps tojson). Outputs must match byte for byte; where jinja2
raises, ftune must raise too, and for raise_exception() with the same message. Cases: real model
templates (Llama 2/3/3.1/3.2, TinyLlama/Zephyr, ChatML/SmolLM2, CodeLlama, Mistral, Gemma, Qwen2,
Qwen2.5, Phi-3.5, DeepSeek-R1-distill, Mistral-Nemo, functionary) over several conversations,
synthetic templates for each language feature and error, a grid of whitespace-control cases,
and seeded random templates.
"""
import itertools
import json
import os
import random
import subprocess
import tempfile

import pytest

try:
    from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
except ImportError:  # without transformers: jinja2 configured exactly as transformers 4.57 does it
    import datetime
    import functools

    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class _GenerationTag(jinja2.ext.Extension):  # transformers' AssistantTracker, inactive
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    @functools.lru_cache
    def compile_template(source):
        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        return env.from_string(source)

TOOL = os.environ.get("FTUNE_RENDER_TEMPLATE_TOOL")
# One feature case spells an unknown escape ('\\q') on purpose; jinja2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")

# ------------------------------------------------------------------------------ real templates
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Llama 3.2 differs from 3.1 mainly by asking strftime_now for today's date.
LLAMA32 = LLAMA31.replace(
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}',
    '{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}')

ZEPHYR = (  # TinyLlama-1.1B-Chat, HuggingFaceH4/zephyr-7b-beta
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CODELLAMA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)

MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS][" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

DEEPSEEK_R1 = """{% if not add_generation_prompt is defined %}
{% set add_generation_prompt = false %}
{% endif %}
{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{% set ns.system_prompt = message['content'] %}
{%- endif %}
{%- endfor %}
{{bos_token}}
{{ns.system_prompt}}
{%- for message in messages %}
{%- if message['role'] == 'user' %}
{%- set ns.is_tool = false -%}
{{'<｜User｜>' + message['content']}}
{%- endif %}
{%- if message['role'] == 'assistant' and message['content'] is none %}
{%- set ns.is_tool = false -%}
{%- for tool in message['tool_calls']%}
{%- if not ns.is_first %}
{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}
{%- set ns.is_first = true -%}
{%- else %}
{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}
{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}
{%- endif %}
{%- endfor %}
{%- endif %}
{%- if message['role'] == 'assistant' and message['content'] is not none %}
{%- if ns.is_tool %}
{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}
{%- set ns.is_tool = false -%}
{%- else %}
{% set content = message['content'] %}
{% if '</think>' in content %}
{% set content = content.split('</think>')[-1] %}
{% endif %}
{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}
{%- endif %}
{%- endif %}
{%- if message['role'] == 'tool' %}
{%- set ns.is_tool = true -%}
{%- if ns.is_output_first %}
{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}
{%- set ns.is_output_first = false %}
{%- else %}
{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}
{%- endif %}
{%- endif %}
{%- endfor -%}
{% if ns.is_tool %}
{{'<｜tool▁outputs▁end｜>'}}
{% endif %}
{% if add_generation_prompt and not ns.is_tool %}
{{'<｜Assistant｜>'}}
{% endif %}"""

FUNCTIONARY = """{# version=v3-llama3.1 #}{%- if not tools is defined -%}
    {%- set tools = none -%}
{%- endif -%}

{%- set has_code_interpreter = tools | selectattr("type", "equalto", "code_interpreter") | list | length > 0 -%}
{%- if has_code_interpreter -%}
    {%- set tools = tools | rejectattr("type", "equalto", "code_interpreter") | list -%}
{%- endif -%}

{#- System message + builtin tools #}
{{- bos_token + "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if has_code_interpreter %}
    {{- "Environment: ipython\\n\\n" }}
{%- else -%}
    {{ "\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n\\n" }}
{%- if tools %}
    {{- "\\nYou have access to the following functions:\\n\\n" }}
    {%- for t in tools %}
        {%- if "type" in t -%}
            {{ "Use the function '"|safe + t["function"]["name"] + "' to '"|safe + t["function"]["description"] + "'\\n"|safe + t["function"] | tojson() }}
        {%- else -%}
            {{ "Use the function '"|safe + t["name"] + "' to '"|safe + t["description"] + "'\\n"|safe + t | tojson() }}
        {%- endif -%}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- "<|eot_id|>" -}}
{%- for message in messages -%}
    {%- if message['role'] == 'user' or message['role'] == 'system' -%}
        {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}
    {%- elif message['role'] == 'tool' -%}
        {{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}
    {%- else -%}
        {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'}}
        {%- if message['content'] -%}
            {{ message['content'] }}
        {%- endif -%}
        {%- if 'tool_calls' in message and message['tool_calls'] -%}
            {%- for tool_call in message['tool_calls'] -%}
                {%- if tool_call["function"]["name"] == "python" -%}
                    {{ '<|python_tag|>' + tool_call['function']['arguments'] }}
                {%- else -%}
                    {{ '<function=' + tool_call['function']['name'] + '>' + tool_call['function']['arguments'] + '</function>' }}
                {%- endif -%}
            {%- endfor -%}
            {{ '<|eom_id|>' }}
        {%- else -%}
            {{ '<|eot_id|>' }}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif -%}"""

REAL_TEMPLATES = {
    "llama2": LLAMA2, "llama3": LLAMA3, "llama31": LLAMA31, "llama32": LLAMA32, "zephyr": ZEPHYR,
    "smollm2": SMOLLM2, "chatml": CHATML, "codellama": CODELLAMA, "mistral_v01": MISTRAL_V01,
    "mistral_v03": MISTRAL_V03, "gemma": GEMMA, "qwen2": QWEN2, "qwen25": QWEN25, "phi35": PHI35,
    "deepseek_r1": DEEPSEEK_R1, "functionary": FUNCTIONARY,
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"},
                           "days": {"type": "integer", "minimum": 1, "default": 1.5}},
            "required": ["city"],
        },
        "return": {"type": "string"},
    },
}

CONVERSATIONS = {
    "sys": [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Who are you"},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "Another question"},
    ],
    "nosys": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  Thanks!\n"},
    ],
    "single": [{"role": "user", "content": "Hi"}],
    "unicode": [
        {"role": "system", "content": "Réponds en français. 日本語も OK 😀"},
        {"role": "user", "content": "Quote \"this\" and 'that' \\ back\tslash\n\nnew paragraph"},
        {"role": "assistant", "content": "<think>hmm</think>\n  Voilà « ok »  "},
    ],
    "bad_order": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "content": "{\"temp\": 21.5}", "tool_call_id": "call12345"},
        {"role": "assistant", "content": "It is 21.5 degrees."},
    ],
    "tools_str": [  # arguments as a JSON string, as functionary and DeepSeek expect
        {"role": "system", "content": "Use tools <wisely> & \"well\"."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "{\"temp\": 21.5}", "tool_call_id": "call12345"},
        {"role": "assistant", "content": "It's <b>21.5</b>."},
    ],
}


def chat_cases():
    cases = []
    for (tname, template), (cname, conv), agp in itertools.product(
            REAL_TEMPLATES.items(), CONVERSATIONS.items(), [False, True]):
        ctx = {"messages": conv, "bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": agp}
        if cname.startswith("tools"):
            ctx["tools"] = [WEATHER_TOOL]
        cases.append((f"{tname}-{cname}-agp{int(agp)}", template, ctx))
    # transformers passes tools=None and documents=None when none are given.
    conv = CONVERSATIONS["sys"]
    for tname in ["llama31", "llama32", "qwen25", "mistral_v03", "functionary"]:
        cases.append((f"{tname}-tools-none", REAL_TEMPLATES[tname],
                      {"messages": conv, "tools": None, "documents": None, "add_generation_prompt": True,
                       "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    cases.append(("llama31-tools-in-system", LLAMA31,
                  {"messages": conv, "tools": [WEATHER_TOOL], "tools_in_user_message": False,
                   "date_string": "01 Jan 2025", "bos_token": "<|begin_of_text|>"}))
    cases.append(("llama31-builtin", LLAMA31,
                  {"messages": CONVERSATIONS["tools"], "builtin_tools": ["get_weather", "code_interpreter"],
                   "bos_token": "<|begin_of_text|>"}))
    cases.append(("llama31-no-first-user", LLAMA31,
                  {"messages": [{"role": "system", "content": "s"}], "tools": [WEATHER_TOOL]}))
    return cases


# ------------------------------------------------------------------------------ feature cases
X_VALUES = {"str": "s", "empty": "", "int": 1, "zero": 0, "float": 1.5, "true": True, "false": False,
            "none": None, "list": [1], "emptylist": [], "dict": {"a": 1}}

FEATURES = [
    # literals and printing
    ("{{ 1 }}|{{ -1 }}|{{ 1.0 }}|{{ 0.1 + 0.2 }}|{{ 1e16 }}|{{ 1e15 }}|{{ 1.5e-5 }}|{{ 0.0001 }}|"
     "{{ 100 / 3 }}|{{ 2 ** 0.5 }}|{{ -0.0 }}|{{ 1_000 }}|{{ 0x1F }}|{{ 0o17 }}|{{ 0b101 }}|{{ 1E3 }}", {}),
    ("{{ 'a\\nb' }}|{{ \"q'uote\" }}|{{ 'tab\\there' }}|{{ '\\x41\\u00e9\\U0001F600' }}|{{ 'adj' 'acent' }}|"
     "{{ '\\q\\'' }}|{{ '\\101' }}", {}),
    ("{{ none }}|{{ None }}|{{ true }}|{{ False }}|{{ [] }}|{{ {} }}|{{ () }}|{{ (1,) }}|{{ (1, 'a') }}", {}),
    ("{{ [1, 'two', 3.0, none, true, [4], {'k': 'v'}, (5, 6)] }}", {}),
    ("{{ {'a': 1, 'b': [1, 2], 'c': {'d': none}} }}", {}),
    ("{{ [\"it's\", 'say \"hi\"', 'both \\' \"', 'back\\\\slash', 'nl\\n', 'é', '\\x00\\x7f\\x85\\xa0\\u200b'] }}", {}),
    ("{{ x }}", {"x": [1.5, "s", None, True, {"a": [1, 2.25e-7]}, 12345678901234567890.0]}),
    ("{{ x }}|{{ x | string }}|{{ x ~ '' }}", {"x": {"k": "v", "n": None, "nested": {"f": 0.5}}}),
    ("{{ a, b }}|{{ (a, b) }}", {"a": 1, "b": "two"}),
    # arithmetic
    ("{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} "
     "{{ 2 ** 10 }} {{ 2 ** -1 }} {{ 10 / 4 }} {{ 3 * 'ab' }} {{ [1] * 3 }} {{ 'a' ~ 1 ~ none ~ true }} "
     "{{ 1 + 2 * 3 - 4 }} {{ (1 + 2) * 3 }} {{ -2 ** 2 }} {{ 2 * -1 }} {{ 2 ** 3 ** 2 }} {{ 10 - 2 - 3 }}", {}),
    ("{{ 1 + 1.5 }} {{ true + 1 }} {{ 'a' + 'b' }} {{ [1] + [2] }} {{ (1,) + (2,) }} {{ -x }} {{ +x }} {{ 5.0 // 2 }}",
     {"x": 3}),
    ("{{ n + 1 }} {{ n * 2 }} {{ n / 2 }} {{ n // 2 }} {{ n % 7 }} {{ f * 3 }} {{ f - 0.1 }}",
     {"n": 123456789, "f": 0.1}),
    # comparisons and logic
    ("{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 1 != 2 }} "
     "{{ 'b' in 'abc' }} {{ 'x' not in ['x'] }} {{ 'k' in {'k': 1} }} {{ none == none }} {{ true == 1 }} "
     "{{ 2 >= 2.0 }} {{ 'B' < 'a' }} {{ 'é' > 'z' }} {{ [1] == [1] }} {{ {'a': 1} == {'a': 1} }} {{ (1, 2) == [1, 2] }}", {}),
    ("{{ 0 or 'default' }} {{ 'a' and 'b' }} {{ '' and 'b' }} {{ none or none }} {{ not 0 }} {{ not 'x' }} "
     "{{ [] or [1] }} {{ 1 and 0 or 5 }} {{ not not 3 }} {{ not 1 == 2 }}", {}),
    *[("{{ 'yes' if x else 'no' }} {{ 'yes' if not x else 'no' }} [{{ 'only' if x }}] {{ 'a' if x else 'b' if not x else 'c' }}",
       {"x": v}) for v in X_VALUES.values()],
    ("{{ y == none }} {{ y is none }} {{ y is defined }} {{ y is not defined }} {{ y | default('d') }} "
     "{{ not y }} [{{ y }}] {{ 'a' ~ y ~ 'b' }} {{ y | length }} {{ y | list }} {{ 'x' in y }} {{ y == y }} "
     "{{ y | trim }} {{ y | upper }} {{ y | join(',') }} [{{ y | first }}] {{ y is iterable }} {{ y is sequence }} "
     "{{ y is callable }} {% for i in y %}never{% else %}empty{% endfor %} {{ (y or 'fallback') }}", {}),
    # tests
    *[("{{ x is string }} {{ x is number }} {{ x is mapping }} {{ x is iterable }} {{ x is sequence }} "
       "{{ x is none }} {{ x is boolean }} {{ x is true }} {{ x is false }} {{ x is integer }} {{ x is float }} "
       "{{ x is callable }} {{ x is defined }} {{ x is not none }} {{ x is undefined }}", {"x": v})
      for v in X_VALUES.values()],
    ("{{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 9 is divisibleby(4) }} {{ 2 is eq 2 }} "
     "{{ 'abc' is lower }} {{ 'ABC' is upper }} {{ 1 is in [1, 2] }} {{ 'upper' is filter }} {{ 'odd' is test }} "
     "{{ 3 is gt 2 }} {{ 3 is lessthan 2 }} {{ none is sameas none }} {{ 2 is ne 2 }} {{ 2 is ge 3 }} "
     "{{ 'nofilter' is filter }} {{ range is callable }} {{ 2.0 is even }}", {}),
    # string filters
    ("{{ '  hi  ' | trim }}|{{ 'xxhixx' | trim('x') }}|{{ 'hello world-foo(bar' | title }}|"
     "{{ \"they're bill's\" | title }}|{{ 'hELLO wORLD' | capitalize }}|{{ 'abc' | upper }}|{{ 'ABC' | lower }}|"
     "{{ 'aaa' | replace('a', 'b', 2) }}|{{ 'abc' | replace('', '-') }}|{{ 'a<b>&\"\\'' | e }}|"
     "{{ 'abc' | center(9) }}|{{ 'one two  three' | wordcount }}|{{ 'x' | string }}|{{ 123 | string }}|"
     "{{ 'ab' | escape | length }}|{{ '\u00e9t\u00e9 \u00fcber \u03b1\u03b2 \u0434\u0430' | upper }}|{{ '\u00c9T\u00c9' | lower }}", {}),
    ("[{{ 'a\\nb\\n\\nc' | indent(2) }}]|[{{ 'a\\nb' | indent(2, true) }}]|[{{ 'a\\n\\nb' | indent('> ', blank=true) }}]|"
     "[{{ 'x\\n' | indent }}]", {}),
    # list filters
    ("{{ xs | length }} {{ xs | count }} {{ xs | first }} {{ xs | last }} {{ xs | join(', ') }} {{ xs | join }} "
     "{{ xs | list }} {{ xs | reverse | list }} {{ xs | sort | list }} {{ xs | sort(reverse=true) }} "
     "{{ xs | unique | list }} {{ xs | min }} {{ xs | max }} {{ xs | sum }} {{ xs | sum(start=10) }} "
     "{{ xs | select('odd') | list }} {{ xs | reject('odd') | list }} {{ xs | select | list }} "
     "{{ xs | map('string') | join('+') }} {{ xs | select('gt', 1) | list }} {{ none | map('upper') | list }}",
     {"xs": [3, 1, 2, 3, 0]}),
    ("{{ words | sort }} {{ words | sort(case_sensitive=true) }} {{ words | unique | list }} "
     "{{ words | unique(case_sensitive=true) | list }} {{ words | min }} {{ words | max }} "
     "{{ words | map('upper') | join(',') }} {{ words | select('lower') | list }} {{ words | map('replace', 'a', 'x') | list }}",
     {"words": ["b", "A", "a", "C"]}),
    ("{% for k, v in d | items %}{{ k }}={{ v }};{% endfor %}|{% for k, v in d.items() %}{{ k }}:{{ v }}{% endfor %}|"
     "{{ d.keys() | list }}|{{ d.values() | list }}|{{ d.get('a') }}|{{ d.get('zz', 'dflt') }}|{{ d.get('zz') }}|"
     "{{ d | dictsort }}|{{ d | dictsort(by='value', reverse=true) }}|{{ d | length }}|{{ d | list }}|"
     "{{ d | first }}|{{ d.items() | list }}|{{ d | sort }}|{{ d['b'] }}|{{ d.b }}|[{{ d.zz }}]|{{ 'c' in d }}",
     {"d": {"b": 2, "a": 1, "c": 0}}),
    ("{{ msgs | selectattr('role', 'equalto', 'user') | map(attribute='content') | join('|') }}|"
     "{{ msgs | rejectattr('role', 'equalto', 'user') | list | length }}|{{ msgs | selectattr('tool') | list }}|"
     "{{ msgs | map(attribute='missing', default='D') | list }}|{{ msgs | map(attribute='role') | unique | list }}|"
     "{{ msgs | selectattr('role', 'in', ['system', 'assistant']) | map(attribute='role') | list }}|"
     "{{ (msgs | first).content }}|{{ msgs | map(attribute='meta.n') | list }}|{{ msgs | sort(attribute='role') | map(attribute='content') | join }}|"
     "{{ msgs | map(attribute='content') | map('length') | sum }}|{{ msgs | sum(attribute='meta.n') }}|"
     "{{ msgs | max(attribute='content') }}|{{ msgs | selectattr('meta') | list | length }}",
     {"msgs": [{"role": "user", "content": "a", "meta": {"n": 1}}, {"role": "system", "content": "bb", "tool": True, "meta": {"n": 2}},
               {"role": "user", "content": "ccc", "meta": {"n": 3}}]}),
    ("{{ v | tojson }}|{{ v | tojson(indent=2) }}|{{ v | tojson(sort_keys=true) }}|{{ v | tojson(separators=(',', ':')) }}|"
     "{{ v | tojson(indent='\\t') }}|{{ 'é\"\\n\\u0001\\u007f/' | tojson }}|{{ 'é😀' | tojson(ensure_ascii=true) }}|"
     "{{ [] | tojson(indent=2) }}|{{ {} | tojson(indent=2) }}|{{ [1.0, 2.5, 1e100, -0.0, 3] | tojson }}|{{ none | tojson }}|"
     "{{ {1: 'int key', true: 'b'} | tojson }}|{{ (1, 2) | tojson }}|{{ v | tojson(indent=0) }}",
     {"v": {"z": [1, {"y": None, "x": True}], "a": "str", "n": 1.25, "e": [], "d": {}}}),
    ("{{ '42' | int }} {{ '4.7' | int }} {{ 'x' | int }} {{ 'x' | int(7) }} {{ 4.7 | int }} {{ -4.7 | int }} "
     "{{ '0x1A' | int(0, 16) }} {{ ' 12 ' | int }} {{ '1_000' | int }} {{ '3.5' | float }} {{ 3 | float }} {{ 'nope' | float }} "
     "{{ -3 | abs }} {{ -2.5 | abs }} {{ 2.5 | round }} {{ 3.5 | round }} {{ 2.675 | round(2) }} {{ 2.1 | round(0, 'ceil') }} "
     "{{ 2.9 | round(method='floor') }} {{ 7 | round }} {{ true | int }} {{ '1e3' | float }} {{ none | int }} {{ '  -7 ' | int }}", {}),
    ("{{ missing | default('d') }} {{ missing | d('d2') }} {{ '' | default('e') }} {{ '' | default('e', true) }} "
     "{{ none | default('n') }} {{ 0 | d('z', boolean=true) }} {{ missing | default }}", {}),
    ("{{ '%s and %s' | format('a', 'b') }} {{ '%d%%' | format(50) }} {{ '%.2f' % 3.14159 }} {{ '%5s|%-5s|' % ('a', 'b') }} "
     "{{ '%r' % 'x' }} {{ '%(a)s' % {'a': 1} }} {{ '{} {}'.format('x', 1) }} {{ '{0}{name}'.format('p', name='n') }} "
     "{{ '%03d' % 7 }} {{ '%x' % 255 }} {{ '%s' % [1, 'a'] }}", {}),
    # methods
    ("{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.strip(' h') }}|{{ s.split() }}|{{ s.split(' ') }}|"
     "{{ s.split('l', 1) }}|{{ s.rsplit('l', 1) }}|{{ s.rsplit(None, 1) }}|{{ s.startswith('  he') }}|{{ s.endswith(('x', 'd  ')) }}|"
     "{{ s.upper() }}|{{ s.lower() }}|{{ s.title() }}|{{ s.replace('l', 'L') }}|{{ s.replace('l', 'L', 1) }}|{{ s.find('o') }}|"
     "{{ s.rfind('o') }}|{{ s.count('l') }}|{{ '-'.join(['a', 'b']) }}|{{ s.strip().capitalize() }}|{{ 'a,b,,c'.split(',') }}|"
     "{{ 'x\\ny\\r\\nz'.splitlines() }}|{{ '42'.isdigit() }}|{{ 'ab'.isalpha() }}|{{ s.split(None, 1) }}|"
     "{{ 'Hello'.swapcase() }}|{{ 'abc'.removeprefix('a') }}|{{ 'a=b=c'.partition('=') }}|{{ '7'.zfill(3) }}|"
     "{{ 'x'.ljust(3, '.') }}|{{ 'x'.rjust(3) }}|{{ 'aXbX'.index('X') }}|{{ s.islower() }}|{{ 'ABC'.isupper() }}",
     {"s": "  hello world  "}),
    ("{{ s | length }}|{{ s[1] }}|{{ s[-1] }}|{{ s[1:3] }}|{{ s[::-1] }}|{{ s | upper }}|{{ s.title() }}|"
     "{{ s | reverse }}|{{ s | list }}|{{ s | tojson }}|{{ s.find('ü') }}|{{ s | center(30) }}|{{ s.split() }}|"
     "{{ s | first }}|{{ s | last }}|{{ s[3:100] | length }}", {"s": "héllo wörld ü 日本語 😀"}),
    ("{{ xs[1:] }}|{{ xs[:-1] }}|{{ xs[::-1] }}|{{ xs[::2] }}|{{ xs[-2:] }}|{{ xs[1:3] }}|{{ xs[5:] }}|"
     "{{ xs[-100:2] }}|{{ xs[3:1:-1] }}|{{ xs[0] }}|{{ xs[-1] }}|[{{ xs[10] }}]|{{ xs.0 }}|{{ xs[:] }}|"
     "{{ xs[1:-1:2] }}|{{ xs[-1:-6:-2] }}|{{ xs[::-3] }}|{{ xs.index(3) }}|{{ xs.count(2) }}|[{{ xs['a'] }}]",
     {"xs": [0, 1, 2, 3, 4, 5]}),
    # control flow
    ("{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}"
     "{{ loop.last }}{{ loop.length }}{{ loop.cycle('a', 'b') }}[{{ loop.previtem }}|{{ loop.nextitem }}]"
     "{{ loop.depth }};{% endfor %}", {"xs": ["p", "q", "r"]}),
    ("{% for x in xs if x > 1 %}{{ x }}-{{ loop.index }}/{{ loop.length }}{% if not loop.last %},{% endif %}"
     "{% else %}none{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}|"
     "{% for x in xs if x > 100 %}x{% else %}filtered{% endfor %}", {"xs": [3, 1, 2, 5]}),
    ("{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}"
     "{% endfor %}|{% for x in xs %}{% for y in xs %}{% if y > x %}{% break %}{% endif %}{{ y }}{% endfor %};{% endfor %}",
     {"xs": [1, 2, 3, 4, 5]}),
    ("{% for a in [1, 2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }}{% endfor %}{{ loop.index }};{% endfor %}", {}),
    ("{% for a, b in [[1, 2], (3, 4), 'xy'] %}{{ a }}{{ b }}{% endfor %}|{% for k in {'z': 1, 'a': 2} %}{{ k }}{% endfor %}|"
     "{% for c in 'héj' %}[{{ c }}]{% endfor %}|{% for (a, b) in [(1, 2)] %}{{ a + b }}{% endfor %}", {}),
    ("{% set x = 0 %}{% for i in range(3) %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}|"
     "{% set ns = namespace(t=0, items=[]) %}{% for i in range(4) %}{% set ns.t = ns.t + i %}{% endfor %}{{ ns.t }}|"
     "{% if true %}{% set y = 5 %}{% endif %}{{ y }}|{% for i in [1] %}{% set inner = 1 %}{% endfor %}[{{ inner }}]|"
     "{% for i in range(2) %}{{ z }}{% set z = i %}{{ z }}{% endfor %}", {}),
    ("{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = 1, 2 %}{{ c }}{% set d = [3, 4] %}{% set e, f = d %}{{ e * f }}", {}),
    ("{% set block %}  inner {{ 1 + 1 }}  {% endset %}[{{ block }}]{% set up | upper | trim %} shout {% endset %}[{{ up }}]", {}),
    ("{% macro greet(name, punct='!') %}Hello {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} {{ greet('B', '?') }} "
     "{{ greet(name='C') }} [{{ greet() }}] {{ greet('D') | upper }}", {}),
    ("{% macro m(x) %}{% for i in range(x) %}{{ i }}{% endfor %}{% endmacro %}{% set ns = namespace(s='') %}"
     "{% for i in range(3) %}{% set ns.s = ns.s ~ m(i) ~ ',' %}{% endfor %}{{ ns.s }}", {}),
    ("{% filter upper %}abc {{ 'd' }}{% endfilter %}|{% filter trim | replace('a', 'b') %}  aaa  {% endfilter %}", {}),
    ("{% raw %}{{ not evaluated }} {% if %}{% endraw %}|{%- raw %}  x  {% endraw -%}  |", {}),
    ("{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}[{{ a }}]", {}),
    ("a{# comment #}b{#- trim -#} c  {# x #}\nd{# multi\nline #}e", {}),
    ("{{ range(3) | list }} {{ range(1, 10, 3) | list }} {{ range(5, 0, -2) | list }} {% for i in range(2) %}{{ i }}{% endfor %} "
     "{{ range(0) | list }} {{ range(3) | length }}", {}),
    ("{% set d = {'a': 1, 'b': 2, 'a': 3} %}{{ d }}|{{ dict(x=1, y='z') }}|{{ dict(d, c=4) }}|{{ namespace(a=1) }}|"
     "{{ {'k': [1, {'n': none}]}['k'][1]['n'] }}|{{ {'a': 1}.a }}", {}),
    ("{% generation %}gen {{ 1 }}{% endgeneration %}|{% for m in messages %}{% if m.role == 'assistant' %}"
     "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
     {"messages": CONVERSATIONS["nosys"]}),
    ("{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%B %A %j %%') }}", {}),
    ("{{ messages[0].content.split('/')[-1] }}{{ messages[-1]['role'] }}{{ messages|length }}",
     {"messages": [{"role": "user", "content": "a/b/c"}, {"role": "assistant", "content": "x"}]}),
    ("{% if messages[0].content is string %}str{% endif %}{% for part in messages[1].content %}"
     "{% if part.type == 'text' %}{{ part.text }}{% elif part['type'] == 'image' %}<img>{% endif %}{% endfor %}",
     {"messages": [{"role": "user", "content": "plain"},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "caption"}]}]}),
    ("{{ 'a' if true }}{% if x is defined and x.y is defined %}{{ x.y }}{% endif %}{{ x['y'] }}{{ x.get('y') }}",
     {"x": {"y": "why"}}),
    ("line1\r\nline2\r{% if true %}\r\nx\r\n{% endif %}\r\n", {}),
    ("trailing newline\n", {}),
    ("two trailing\n\n", {}),
    ("{{ 'x' }}\n", {}),
    ("text {#", {}),  # jinja2's lexer accepts an unterminated comment or raw block at the very end
    ("text  {%- raw -%}  ", {}),
    ("[{{ x.y }}]", {"x": None}),
    # scoping
    ("{% for x in xs %}{% if x > 1 %}{% set big = x %}{% endif %}[{{ big }}]{% endfor %}[{{ big }}][{{ x }}]",
     {"xs": [1, 2, 3]}),
    ("{% set x = 'outer' %}{% for x in [1, 2] %}{{ x }}{% endfor %}{{ x }}|{% for i in [1] %}{% set x = 'in' %}{{ x }}{% endfor %}{{ x }}",
     {}),
    ("{% set ns = namespace(n=0) %}{% macro bump() %}{% set ns.n = ns.n + 1 %}{% endmacro %}{{ bump() }}{{ bump() }}{{ ns.n }}"
     "{% macro loc() %}{% set q = 1 %}{{ q }}{% endmacro %}{{ loc() }}[{{ q }}]", {}),
    ("{% for m in messages %}{% set messages = [] %}{{ m.role }}{{ messages | length }}{% endfor %}{{ messages | length }}",
     {"messages": CONVERSATIONS["nosys"]}),
    ("{% for a in [1, 2] %}{% set outer = loop %}{% for b in [1, 2, 3] %}{{ outer.index }}{{ loop.index }} {% endfor %}{% endfor %}",
     {}),
    # whitespace inside real-looking templates
    ("{% for m in messages %}\n    {{ m.role }}: {{ m.content }}\n    {%- if not loop.last %}\n\n    {% endif %}\n{% endfor %}\n",
     {"messages": CONVERSATIONS["nosys"]}),
    ("\t{% if true %}\n\t\tx\n\t{% endif %}\n  {{ 'y' }}  \n  {# c #}\n  z", {}),
    ("{% if true %}  {% if true %}\n    a\n  {%- endif %}\n{% endif %}", {}),
    ("x {% if true %}y{% endif %} z\n  {%+ if true %}k{% endif %}\n", {}),
    ("{{- 'a' }}\n  {%- if true -%}\n\n  b  \n\n  {%- endif -%}  \n\n  c", {}),
    ("{%- for i in range(2) -%}\n  {{ i }}\n{%- endfor -%}", {}),
    ("{%- set x = 1 -%}\n\n{{- x -}}\n\n{%- set y = 2 %}\n{{ y }}", {}),
    # jinja2's compile-time scoping: a name first assigned at a frame's own level starts undefined
    # there, even when the context has it; one assigned only inside an if-branch does not.
    ("{% for i in [1] %}[{{ s }}]{% endfor %}{% set s = 'late' %}{{ s }}|{{ t }}{% set t = 'set' %}{{ t }}",
     {"s": "ctx", "t": "ctx"}),
    ("{% for i in [1] %}[{{ s }}]{% endfor %}{% if false %}{% set s = 1 %}{% endif %}[{{ s }}]", {"s": "ctx"}),
    ("{% for i in [1, 2] %}{% for j in [1] %}[{{ t }}]{% endfor %}{% set t = i %}{{ t }}{% endfor %}", {"t": "ctx"}),
    ("{% macro m() %}{{ late }}{% endmacro %}[{{ m() }}]{% set late = 1 %}[{{ m() }}]", {"late": "ctx"}),
    ("{% with %}{% for i in [1] %}[{{ w }}]{% endfor %}{% set w = 2 %}{% endwith %}[{{ w }}]", {"w": "ctx"}),
    ("{% for i in [1] %}{% if true %}{% set v = 1 %}{% endif %}{% endfor %}{% set k = 0 %}{% for i in [1] %}"
     "{{ k }}{% set k = 5 %}{{ k }}{% endfor %}{{ k }}", {}),
    # Markup from |safe and |e: `+` with a plain string escapes the plain side (functionary relies on it)
    ("{{ ('<'|safe + '<') }}|{{ '<'|e }}|{{ ('<'|e)|e }}|{{ '<'|forceescape }}|{{ ('a'|safe + '<')|upper }}|"
     "{{ ('a'|safe)|title + '<' }}|{{ ('a'|safe)|trim + '<' }}|{{ ('a'|safe)|string + '<' }}|{{ '<' + 'a'|safe }}|"
     "{{ 'x'|safe is escaped }}|{{ ('a'|safe ~ '<') + '<' }}|{{ ('%s'|safe) % '<' }}|{{ ('%s'|safe)|format('<') }}|"
     "{{ ('ab'|safe)[0] + '<' }}|{{ ('a'|safe).strip() + '<' }}|{{ ('a'|safe * 2) + '<' }}|{{ ('a'|safe).replace('a', '<') }}|"
     "{{ ['<']|join('|'|safe) }}|{{ 1|safe + '<' }}|{{ ('a'|safe)|replace('a','<') + '<' }}|{{ ('a'|safe)|center(3) + '<' }}|"
     "{{ ('a'|safe)|first + '<' }}|{{ ('a'|safe)|indent + '<' }}|{{ none|safe + '<' }}|{{ ('<'|e)|length }}|"
     "{{ ('x'|safe).split()[0] + '<' }}|{{ ['a'|safe] }}|{{ '\"'|e ~ \"'\"|e }}", {}),
    # Python corner cases
    ("{{ 2.5 is odd }} {{ 3.0 is odd }} {{ 'abc' % nope }} {{ 'abc' % [1] }} {{ '%s' % [1] }} {{ '%s' % {'a': 1} }}", {}),
]
# Floats and strings that stress repr/str/json formatting.
_rng = random.Random(1234)
_FLOATS = ([0.1 * i for i in range(12)] + [10.0 ** e for e in range(-7, 22)] + [-2.5e-5, 123456789.125, 1 / 3, 2 / 3,
           1e16 - 2, 9007199254740993.0, 5e-324, 1.7976931348623157e308]
           + [_rng.uniform(-1e6, 1e6) for _ in range(40)] + [_rng.uniform(-1, 1) * 10 ** _rng.randint(-12, 25) for _ in range(40)])
_STRINGS = ["", "'", '"', "'\"", "\\", "\x00\x01\x1f\x7f", "\t\n\r\x0b\x0c", "\x80\x9f\xa0\xad\xff",
            "\u2028\u2029\u200b\ufeff\u3000", "日本語", "😀🎉", "\ue000", "a'b\"c", "\u0300e", "\U0001F600x"]
FEATURES += [
    ("{% for x in xs %}{{ x }}|{{ x | tojson }}|{{ x | round(3) }}|{{ [x] }}|{{ x | int if x | abs < 1e18 else 'big' }}|{{ (x * 3) // 7 }}|{{ x % 1.5 }};{% endfor %}",
     {"xs": _FLOATS}),
    ("{% for s in ss %}{{ [s] }}|{{ s | tojson }}|{{ s | tojson(ensure_ascii=true) }}|{{ s | length }}|{{ s | trim | length }};{% endfor %}",
     {"ss": _STRINGS}),
    ("{{ ss }}|{{ {'k': ss} }}", {"ss": _STRINGS}),
]

ERROR_CASES = [
    ("{{ raise_exception('Bad: ' ~ x) }}", {"x": "ä \"q\" 1"}),
    ("{% if x %}{{ raise_exception('only if') }}{% endif %}ok", {"x": True}),
    ("{{ nope.attr }}", {}),
    ("{{ nope['k'] }}", {}),
    ("{{ d.missing.deeper }}", {"d": {}}),
    ("{{ 1 + 'a' }}", {}),
    ("{{ 'a' + 1 }}", {}),
    ("{{ 'a' - 'b' }}", {}),
    ("{{ nope + 1 }}", {}),
    ("{% for %}", {}),
    ("{% endfor %}", {}),
    ("{{ x | nosuchfilter }}", {"x": 1}),
    ("{{ x is nosuchtest }}", {"x": 1}),
    ("{% if x %}unclosed", {"x": 1}),
    ("{% for x in y %}unclosed", {"y": []}),
    ("{{ 1 / 0 }}", {}),
    ("{{ 5 // 0 }}", {}),
    ("{{ unknown() }}", {}),
    ("{{ none < 1 }}", {}),
    ("{{ 'a' < 1 }}", {}),
    ("{% set x = 1 %}{% set x.y = 2 %}", {}),
    ("{{ messages.append(1) }}", {"messages": []}),
    ("{{ xs | select('odd') | tojson }}", {"xs": [1, 2]}),
    ("{{ x | length }}", {"x": 5}),
    ("{{ xs | select('odd') | length }}", {"xs": [1, 2]}),
    ("{% for x in 5 %}{% endfor %}", {}),
    ("{{ x | tojson }}", {}),
    ("{{ 'unterminated }}", {}),
    ("{{ }}", {}),
    ("{{ (1 }}", {}),
    ("{{ [1, 2 }}", {}),
    ("{% if true %}{% else %}{% else %}{% endif %}", {}),
    ("{% break %}", {}),
    ("{{ 1 is }}", {}),
    ("{% set %}", {}),
    ("{% unknowntag %}", {}),
    ("{# unterminated comment", {}),
    ("{{ 'a'.nosuchmethod() }}", {}),
    ("{% for a, b in [1, 2] %}{% endfor %}", {}),
    ("{{ range(200000) | length }}", {}),
    ("{{ x[::0] }}", {"x": [1]}),
    ("{{ loop.index }}", {}),
    ("{{ s is sequence not in [1] }}", {"s": "a"}),
    ("{{ 0 | indent(2) }}", {}),
    ("{{ [{'a': 1}] | unique | list }}", {}),
    ("{{ {'a': 1} in {'k': 1} }}", {}),
    ("{{ x[1:] }}", {"x": 5}),
    ("{{ x[1.5:] }}", {"x": [1, 2]}),
    ("{{ '%s %s' % (1,) }}", {}),
]

# Whitespace control: every tag flavour between texts that exercise trim_blocks and lstrip_blocks.
WS_TAGS = [
    "{% if true %}X{% endif %}", "{%- if true %}X{% endif %}", "{% if true -%}X{%- endif %}",
    "{%+ if true %}X{% endif +%}", "{% if true %}\n  X\n  {% endif %}", "{%- if true -%}\n X \n{%- endif -%}",
    "{{ 'X' }}", "{{- 'X' -}}", "{{- 'X' }}", "{# c #}", "{#- c -#}", "{#+ c +#}", "{#- c #}",
    "{% set z = 1 %}", "{%- set z = 1 -%}", "{% for i in [1] %}X{% endfor %}", "{% raw %}X{% endraw %}",
    "{%- raw -%} X {%- endraw -%}", "{% raw %}\n  X\n  {% endraw %}",
]
WS_PRE = ["", "a", "a\n", "a\n  ", "\n\t ", "a  ", "  ", "\n\n", " \u3000"]
WS_POST = ["", "b", "\nb", "  \nb", " \n\n b", "\n", "\n  "]
WS_MID = ["\n", "  \n  ", " ", "\n\n  "]


def ws_cases():
    cases = []
    for i, (tag, pre, post) in enumerate(itertools.product(WS_TAGS, WS_PRE, WS_POST)):
        cases.append((f"ws{i}", pre + tag + post, {}))
    for i, (t1, t2, mid) in enumerate(itertools.product(WS_TAGS, WS_TAGS, WS_MID)):
        if i % 4 == 0:
            cases.append((f"ws2-{i}", "a\n  " + t1 + mid + t2 + "\n  b", {}))
    return cases


# Seeded random templates: nested tags with random whitespace control, assignments at several
# scope levels, and expressions over a small context. Deterministic, so a failure reproduces.
_FUZZ_EXPRS = ["x", "y", "s", "xs", "d", "u", "ns.v", "loop.index", "i", "1", "'q'", "none", "x ~ s", "x == 1",
               "y or s", "x and y", "not y", "xs | length", "s | upper", "s | trim", "d | tojson", "u | default('D')",
               "xs | join('-')", "s.split()", "d.items() | list", "xs[1:]", "s[::-1]", "(x if y else s)", "x is defined",
               "u is defined", "[x, y]", "d.a", "xs | map('string') | list", "s ~ (y | string)", "'a' ~ u ~ 'b'"]


def _fuzz_cases(n, seed=20240607):
    rng = random.Random(seed)
    ws = ["", " ", "\n", "  \n", "\n  ", "\t", "\n\n"]

    def tag(body):
        return rng.choice(["{%", "{%-", "{%+"]) + " " + body + " " + rng.choice(["%}", "-%}", "+%}"])

    def stmt(depth):
        r = rng.random()
        if depth > 2 or r < 0.35:
            return (rng.choice(ws) + rng.choice(["{{ ", "{{- "]) + rng.choice(_FUZZ_EXPRS) +
                    rng.choice([" }}", " -}}"]) + rng.choice(ws + ["t"]))
        if r < 0.5:
            out = tag("if " + rng.choice(_FUZZ_EXPRS)) + body(depth)
            if rng.random() < 0.4:
                out += tag("else") + body(depth)
            return out + tag("endif")
        if r < 0.65:
            out = tag("for i in " + rng.choice(["xs", "s", "d", "range(x)", "xs if i > 1"])) + body(depth)
            if rng.random() < 0.3:
                out += tag("else") + body(depth)
            return out + tag("endfor")
        if r < 0.8:
            return tag(f"set {rng.choice(['x', 'y', 's', 'u', 'ns.v'])} = {rng.choice(_FUZZ_EXPRS)}")
        if r < 0.9:
            return rng.choice(ws) + rng.choice(["{# c #}", "{#- c -#}", "{#- c #}", "{# c -#}"]) + rng.choice(ws)
        return rng.choice(ws) + "txt" + rng.choice(ws)

    def body(depth):
        return "".join(stmt(depth + 1) for _ in range(rng.randint(1, 3)))

    cases = []
    for k in range(n):
        ctx = {"x": rng.choice([0, 1, 3]), "y": rng.choice([True, False, None, "", "yy"]),
               "xs": rng.choice([[], [3, 1, 2], ["b"]]), "d": {"b": 2, "a": 1}, "s": rng.choice(["abc", " a b ", "héllo"])}
        cases.append((f"fuzz{k}", "{% set ns = namespace(v=0) %}" + body(0), ctx))
    return cases


CASES = (chat_cases()
         + [(f"feature{i}", t, c) for i, (t, c) in enumerate(FEATURES)]
         + [(f"error{i}", t, c) for i, (t, c) in enumerate(ERROR_CASES)]
         + ws_cases()
         + _fuzz_cases(800))


def oracle(template, context):
    try:
        return compile_template(template).render(**context)
    except Exception as e:  # noqa: BLE001 - any jinja2 failure must be a failure in ftune too
        return {"error": str(e), "type": type(e).__name__}


@pytest.fixture(scope="module")
def ftune_outputs():
    assert TOOL and os.path.exists(TOOL), "FTUNE_RENDER_TEMPLATE_TOOL must name the built render_template_tool"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cases.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"template": t, "context": c} for _, t, c in CASES], f, ensure_ascii=False)
        out = subprocess.run([TOOL, path], capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        results = json.loads(out.stdout.decode("utf-8"))
    assert len(results) == len(CASES)
    return {name: got for (name, _, _), got in zip(CASES, results)}


@pytest.fixture(scope="module")
def oracle_outputs():
    return {name: oracle(t, c) for name, t, c in CASES}


def mismatch(want, got):
    """None when ftune's result `got` equals transformers' rendering `want`, else a description."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"jinja2 raised {want['type']}: {want['error']!r}; ftune rendered {got!r}"
        if not got["error"].startswith("chat template: "):
            return f"bad error prefix: {got['error']!r}"
        if want["type"] == "TemplateError" and got["error"] != "chat template: " + want["error"]:
            return f"raise_exception message differs: want {want['error']!r}, got {got['error']!r}"
        return None
    return None if got == want else f"want {want!r}\n     got  {got!r}"


def group_of(name):
    return name.split("-")[0] if "-" in name else name.rstrip("0123456789")


GROUPS = sorted({group_of(name) for name, _, _ in CASES})


# One test per group (a real template, the features, the errors, the whitespace grid) keeps the
# run short; a failure lists every mismatching case of the group by name.
@pytest.mark.parametrize("group", GROUPS)
def test_matches_transformers(ftune_outputs, oracle_outputs, group):
    failures = []
    for name, template, context in CASES:
        if group_of(name) != group:
            continue
        problem = mismatch(oracle_outputs[name], ftune_outputs[name])
        if problem:
            failures.append(f"{name}: template {template[:200]!r}\n     {problem[:1500]}")
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:10])


def test_cases_cover_errors_and_exceptions(oracle_outputs):
    # The suite would prove little if the oracle never raised or raise_exception never fired.
    errors = [k for k in oracle_outputs.values() if isinstance(k, dict)]
    assert sum(1 for e in errors if e["type"] == "TemplateError") >= 10
    assert len(errors) >= 40
