"""scripts/html_corpus.py keeps a page's main prose: no code blocks, navigation or sidebars, self-closing tags
inside the main content do not end it."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("html_corpus", Path(__file__).parents[1] / "scripts" / "html_corpus.py")
html_corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(html_corpus)

PAGE = """<html><head><title>T</title><script>var x = 1;</script></head><body>
<nav>Home | Next</nav>
<div class="sidebar">Previous topic</div>
<div class="body" role="main">
<h1>functools<a class="headerlink">¶</a></h1>
<p>The <code>functools</code> module is for higher-order functions.</p>
<hr class="docutils" />
<pre>def f(x):
    return x</pre>
<p>Second paragraph<br/>continues.</p>
</div>
<div class="footer">Copyright</div>
</body></html>"""


def test_page_text_keeps_the_main_prose_only():
    text = html_corpus.page_text(PAGE)
    assert text.splitlines() == ["functools", "The functools module is for higher-order functions.",
                                 "Second paragraph", "continues."]


def test_page_without_a_main_element_keeps_the_body():
    text = html_corpus.page_text("<html><body><p>One.</p><pre>code</pre><p>Two.</p></body></html>")
    assert text.splitlines() == ["One.", "Two."]


def test_long_pages_are_cut_into_parts_at_paragraph_boundaries():
    paras = [" ".join(f"w{i}_{j}" for j in range(30)) for i in range(10)]  # 10 paragraphs of 30 words
    text = "\n".join(paras)
    assert html_corpus.parts(text, 0, 150) == [text]  # off: the whole page
    cut = html_corpus.parts(text, 100, 20)
    assert [len(c.split()) for c in cut] == [120, 120, 60]  # >= 100 words each; the tail keeps its 60 (>= 20)
    assert "\n".join(cut) == text  # nothing lost, nothing reordered, cuts only between paragraphs
    cut = html_corpus.parts(text, 100, 80)
    assert [len(c.split()) for c in cut] == [120, 180]  # a tail under --min-words joins the part before
    assert html_corpus.parts(paras[0], 100, 20) == [paras[0]]  # a short page stays one document
