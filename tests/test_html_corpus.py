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
