{# The search index as a classic script: pages opened from file:// cannot fetch() JSON.
   An entry: [id, label, href, classes it pushes up]; ATLAS_LABELS: the class labels known. #}
window.ATLAS_SEARCH = {{ search | tojson }};
window.ATLAS_LABELS = {{ labels | tojson }};
