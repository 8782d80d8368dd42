"""Renders chat templates with Jinja2 set up as transformers 4.45.1's apply_chat_template sets it up
(utils/chat_template_utils.py, _compile_jinja_template), and writes the cases with their expected text.

Usage (from the repository root): python3 tests/data/chat-templates/reference.py ../shared/models > tests/data/chat-templates/reference.json
"""
import json
import os
import sys
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

NOW = datetime(2024, 7, 26, 9, 5, 3)  # the clock strftime_now reads in these cases


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: NOW.strftime(fmt)
    return env


def special_tokens(folder):
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    roles = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
    out = {r: config[r] for r in roles if isinstance(config.get(r), str)}
    if config.get("additional_special_tokens"):
        out["additional_special_tokens"] = config["additional_special_tokens"]
    return config["chat_template"], out


def render(template, specials, case):
    variables = dict(case.get("variables", {}))
    return environment().from_string(template).render(
        messages=case.get("messages", []),
        tools=case.get("tools"),
        documents=None,
        add_generation_prompt=case.get("add_generation_prompt", False),
        **{**specials, **variables},
    )


DOC = "Summarize the following article in one sentence.\n\nThe 33-year-old, who won the Champions League in 2010, was a free agent."
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, \u00b0C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Z\u00fcrich"}}}]}
MULTI = [SYSTEM, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "  Hello! How can I help?  "},
         {"role": "user", "content": DOC}]

conversations = [
    ("system and user", {"messages": [SYSTEM, {"role": "user", "content": DOC}], "add_generation_prompt": True}),
    ("no system message", {"messages": [{"role": "user", "content": DOC}], "add_generation_prompt": True}),
    ("multi-turn", {"messages": MULTI, "add_generation_prompt": True}),
    ("multi-turn, no generation prompt", {"messages": MULTI, "add_generation_prompt": False}),
    ("tools", {"messages": [SYSTEM, {"role": "user", "content": "Weather in Zurich?"}], "tools": [TOOL],
               "add_generation_prompt": True}),
    ("tool call and responses", {"messages": [{"role": "user", "content": "Weather in Zurich?"}, CALL,
                                              {"role": "tool", "content": "21 degrees"},
                                              {"role": "tool", "content": "sunny"}],
                                 "tools": [TOOL], "add_generation_prompt": True}),
]

cases = []
for folder in ["qwen2-tiny", "llama3-tokenizer-tiny"]:
    template, specials = special_tokens(os.path.join(sys.argv[1], folder))
    for name, case in conversations:
        for date in ([{"date_string": "26 Jul 2024"}, {}] if folder.startswith("llama") else [{}]):
            c = dict(case, variables=date)
            label = name + ("" if date or not folder.startswith("llama") else ", date from strftime_now")
            cases.append({"name": folder + ": " + label, "folder": folder, **c, "expected": render(template, specials, c)})

MESSAGES = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
VARS = {"name": "World", "x": True, "n": None, "s": "abcdef", "xs": [1, 2, 3, 4], "d": {"b": 1, "a": [True, None, 2.5, "\u00e9\n\"q\""]}}
inline = [
    ("text and output", "Hello {{ name }}!\n{% if x %}\n  yes\n{% endif %}\nend\n"),
    ("minus strips all whitespace", "a  \n {%- if true -%} \n b \n {%- endif -%}\n  c {{- ' d ' -}} e"),
    ("trim_blocks and lstrip_blocks", "line\n    {% if true %}\n    inside\n    {% endif %}\nafter\n  {{ name }}\n"),
    ("plus disables lstrip and trim", "a\n  {%+ if true +%}\nb\n  {% endif %}\nc"),
    ("comments", "a\n{# a comment #}\nb\n  {#- another -#}  c\n    {# indented #}\nd"),
    ("loop variables", "{% for m in messages %}{{ loop.index0 }}/{{ loop.index }}/{{ loop.length }}/{{ loop.revindex }}{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}:{{ m.role }} {% endfor %}"),
    ("loop filter and else", "{% for x in xs if x > 1 %}{{ x }}{{ loop.index }},{% else %}none{% endfor %}|{% for x in [] %}{{ x }}{% else %}empty{% endfor %}"),
    ("dict items", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k, v in d | items %}{{ k }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}"),
    ("namespace", "{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.found = true %}{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}{{ ns.found }} {{ ns.n }}"),
    ("set inside a loop stays in the loop", "{% set x = 1 %}{% for i in [5, 6] %}{% set x = i %}{{ x }}{% endfor %}{{ x }}{% if true %}{% set x = 9 %}{% endif %}{{ x }}"),
    ("slicing and indexing", "{{ xs[1:] }} {{ xs[:-1] }} {{ xs[::-1] }} {{ xs[::2] }} {{ s[1:3] }} {{ s[-2:] }} {{ xs[-1] }} {{ messages[1:][0].role }} {{ messages[0]['content'] }} {{ xs[10] }}."),
    ("filters", "{{ ' a b ' | trim }}|{{ 'x' | upper }}|{{ 'X' | lower }}|{{ xs | length }}|{{ s | length }}|{{ u | default('dflt') }}|{{ '' | default('e', true) }}|{{ xs | join(', ') }}|{{ 3 | string }}|{{ 'hello world' | title }}|{{ 'hello' | capitalize }}|{{ xs | first }}|{{ xs | last }}|{{ xs | reverse | list }}|{{ 'a-b' | replace('-', '+') }}|{{ '42' | int + 1 }}"),
    ("tojson", "{{ d | tojson }}\n{{ d | tojson(indent=2) }}\n{{ xs | tojson(indent=4) }}\n{{ [] | tojson(indent=2) }}{{ {} | tojson }}\n{{ s | tojson }} {{ n | tojson }} {{ 2.0 | tojson }} {{ d | tojson(sort_keys=true) }} {{ '\\x01\\x08\\x0c' | tojson }} {{ ['\\x01', 'a\\\\b'] }}"),
    ("tests", "{{ u is defined }} {{ x is defined }} {{ n is none }} {{ s is string }} {{ d is mapping }} {{ xs is iterable }} {{ s is iterable }} {{ 3 is number }} {{ 4 is even }} {{ 'a' is not string }} {{ xs is sequence }} {{ 5 is divisibleby(5) }} {{ n is not none }} {{ u is undefined }}"),
    ("operators", "{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 7 / 2 }} {{ 1.5 + 1 }} {{ 'a' ~ 1 ~ n }} {{ 'ab' in 'xaby' }} {{ 3 not in xs }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ not true or false }} {{ 'y' if x else 'n' }} {{ 'y' if n else 'n' }} {{ 'q' * 3 }} {{ xs + [5] }} {{ x and 'yes' }} {{ n or 'fallback' }}"),
    ("string methods", "{{ ' hi '.strip() }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith(('x', 'c')) }}|{{ 'a,b,c'.split(',') }}|{{ ' a b  c '.split() }}|{{ 'a,b,c'.split(',', 1) }}|{{ 'xxhixx'.strip('x') }}|{{ '  hi'.lstrip() }}|{{ 'hi  '.rstrip() }}|{{ 'Hi'.upper() }}|{{ 'Hi'.lower() }}|{{ 'a-b'.replace('-', '+') }}"),
    ("literals", "{{ [1, 'a', n, true, 2.5, \"it's\"] }} {{ {'k': [1, 2.5], 'j': {'x': none}} }} {{ {'a': 1}.get('a') }} {{ {'a': 1}.get('b', 'z') }} {{ (1, 2) | length }} {{ 'con' 'cat' }} {{ 'a\\nb\\t\\'c\\'' }}"),
    ("break and continue", "{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}"),
    ("set block", "{% set greeting %}Hi {{ name }}{% endset %}[{{ greeting }}]"),
    ("strftime_now", "{{ strftime_now('%d %b %Y') }} | {{ strftime_now('%Y-%m-%d %H:%M:%S') }} | {{ strftime_now('%A %B %-d, %I %p %j %y') }}"),
    ("selectattr and map", "{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join('|') }} {{ messages | rejectattr('role', 'equalto', 'system') | list | length }} {{ messages | map(attribute='role') | first }}"),
    ("nested loops", "{% for a in [1, 2] %}{% set outer = loop %}{% for b in 'xy' %}{{ outer.index }}{{ b }}{{ loop.index }} {% endfor %}{% endfor %}"),
    ("elif chains and conditional expressions", "{% for m in messages %}{% if m.role == 'system' %}S{% elif m.role == 'user' and not loop.last %}U{% elif m.role == 'user' %}u{% else %}A{% endif %}{% endfor %} {{ (messages | length) if messages else 0 }}"),
    ("a set in a loop body lasts for that iteration", "{% set x = 0 %}{% for i in [1, 2] %}{{ x }}{% set x = i %}{{ x }}{% endfor %}{{ x }}"),
    ("loop.cycle, previtem and nextitem", "{% for m in messages %}{{ loop.cycle('a', 'b', 'c') }}{{ loop.previtem.role if not loop.first else '-' }}{{ loop.nextitem.role if not loop.last else '-' }} {% endfor %}"),
    ("numbers", "{{ -2 | abs }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 10 / 4 }} {{ 10 // 4 }} {{ 2.5 * 2 }} {{ 1e3 }} {{ 0.1 + 0.2 }} {{ 3 * 1.0 }} {{ 2 ** -1 }} {{ 7.5 // 2 }} {{ range(3) | list }} {{ range(1, 7, 2) | join }}"),
    ("special tokens and date_string", "{{ bos_token }}{{ date_string }}{{ eos_token }}"),
]
# Templates in the style of other families' (Mistral, Gemma, Zephyr, Phi-3, Llama-2, DeepSeek-R1), with the
# conversations they accept; a template that raises records the error instead of a text.
ALTERNATING = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello <think>x</think> there"},
               {"role": "user", "content": "Bye"}]
families = [
    ("Mistral style", "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
    ("Gemma style", "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"),
    ("Zephyr style", "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"),
    ("Phi-3 style", "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"),
    ("Llama-2 style", "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"),
    ("DeepSeek-R1 style", "{% set ns = namespace(system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{{ '<|User|>' + message['content'] }}{%- endif %}{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{ '<|Assistant|>' + content + '<|end|>' }}{%- endif %}{%- endfor %}{% if add_generation_prompt %}{{ '<|Assistant|><think>\\n' }}{% endif %}"),
]
for name, template in families:
    for label, messages in [("alternating", ALTERNATING), ("with a system message", MESSAGES)]:
        inline.append((name + ", " + label, template, messages))

for entry in inline:
    name, template = entry[0], entry[1]
    messages = entry[2] if len(entry) > 2 else MESSAGES
    case = {"messages": messages, "add_generation_prompt": True,
            "variables": dict(VARS, bos_token="<s>", eos_token="</s>", date_string="26 Jul 2024")}
    try:
        outcome = {"expected": render(template, {}, case)}
    except jinja2.exceptions.TemplateError as e:
        outcome = {"error": str(e)}
    cases.append({"name": name, "template": template, **case, **outcome})

json.dump({"now": NOW.isoformat(), "jinja2": jinja2.__version__, "cases": cases}, sys.stdout, ensure_ascii=False, indent=1)
print()
